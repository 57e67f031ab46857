//! ONNX nodes of the `op_text` family (see `kiln_ir::op_text`) -> `Op`.
//!
//! StringNormalizer (opset 10), StringSplit, StringConcat, RegexFullMatch
//! (opset 20), TfIdfVectorizer (opset 9) and ImageDecoder (opset 20) each have a
//! single form, so no opset normalization is needed; this module checks the
//! enumerated attributes and TfIdfVectorizer's pool layout once, at load time.

use crate::convert::NodeCtx;
use crate::Result;
use kiln_ir::{Op, TextOp};

/// Parses the node if `op_type` belongs to this family; `Ok(None)` when it does not.
pub(crate) fn convert(op_type: &str, ctx: &mut NodeCtx) -> Result<Option<Op>> {
    let a = ctx.attrs;
    let op = match op_type {
        "StringNormalizer" => {
            let case_change = a.string("case_change_action", "NONE")?;
            if !matches!(case_change.as_str(), "NONE" | "LOWER" | "UPPER") {
                return Err(ctx.invalid(format!(
                    "case_change_action must be NONE, LOWER or UPPER, got '{case_change}'"
                )));
            }
            TextOp::StringNormalizer {
                case_change,
                case_sensitive: a.bool("is_case_sensitive", false),
                stopwords: a.strings("stopwords")?,
                locale: a.string("locale", "")?,
            }
        }
        "StringSplit" => {
            let delimiter = a.string("delimiter", "")?;
            TextOp::StringSplit {
                delimiter: if delimiter.is_empty() {
                    None
                } else {
                    Some(delimiter)
                },
                // Unset or negative: no limit (as Python's str.split).
                maxsplit: a.int_opt("maxsplit").and_then(|m| usize::try_from(m).ok()),
            }
        }
        "StringConcat" => TextOp::StringConcat,
        "RegexFullMatch" => {
            if !a.has("pattern") {
                return Err(ctx.invalid("attribute 'pattern' is missing"));
            }
            TextOp::RegexFullMatch {
                pattern: a.string("pattern", "")?,
            }
        }
        "TfIdfVectorizer" => tfidf(ctx)?,
        "ImageDecoder" => {
            let pixel_format = a.string("pixel_format", "RGB")?;
            if !matches!(pixel_format.as_str(), "RGB" | "BGR" | "Grayscale") {
                return Err(ctx.invalid(format!(
                    "pixel_format must be RGB, BGR or Grayscale, got '{pixel_format}'"
                )));
            }
            TextOp::ImageDecoder { pixel_format }
        }
        _ => return Ok(None),
    };
    Ok(Some(Op::Text(op)))
}

fn tfidf(ctx: &NodeCtx) -> Result<TextOp> {
    let a = ctx.attrs;
    let mode = a.string("mode", "")?;
    if !matches!(mode.as_str(), "TF" | "IDF" | "TFIDF") {
        return Err(ctx.invalid(format!(
            "attribute 'mode' must be TF, IDF or TFIDF, got '{mode}'"
        )));
    }
    let count = |name: &str| -> Result<usize> {
        let v = a
            .int_opt(name)
            .ok_or_else(|| ctx.invalid(format!("attribute '{name}' is missing")))?;
        usize::try_from(v).map_err(|_| ctx.invalid(format!("attribute '{name}' is {v}")))
    };
    let min_gram_length = count("min_gram_length")?;
    let max_gram_length = count("max_gram_length")?;
    let max_skip_count = count("max_skip_count")?;
    if min_gram_length < 1 || max_gram_length < min_gram_length {
        return Err(ctx.invalid(format!(
            "gram lengths must satisfy 1 <= min_gram_length <= max_gram_length, got {min_gram_length} and {max_gram_length}"
        )));
    }
    let pool_int64s = a.ints("pool_int64s").unwrap_or(&[]).to_vec();
    let pool_strings = a.strings("pool_strings")?;
    if !pool_int64s.is_empty() && !pool_strings.is_empty() {
        return Err(ctx.invalid("only one of pool_int64s and pool_strings may be set"));
    }
    let pool_len = pool_int64s.len().max(pool_strings.len());
    let usizes = |name: &str| -> Result<Vec<usize>> {
        a.ints(name)
            .unwrap_or(&[])
            .iter()
            .map(|&v| {
                usize::try_from(v).map_err(|_| {
                    ctx.invalid(format!("attribute '{name}' has a negative value {v}"))
                })
            })
            .collect()
    };
    let ngram_counts = usizes("ngram_counts")?;
    let ngram_indexes = usizes("ngram_indexes")?;
    // Count the pool's n-grams level by level, checking the layout.
    let mut total = 0usize;
    for (i, &start) in ngram_counts.iter().enumerate() {
        let end = ngram_counts.get(i + 1).copied().unwrap_or(pool_len);
        if start > end || end > pool_len {
            return Err(ctx.invalid(format!(
                "ngram_counts {ngram_counts:?} does not fit a pool of {pool_len} items"
            )));
        }
        let n = i + 1;
        if (end - start) % n != 0 {
            return Err(ctx.invalid(format!(
                "pool items {start}..{end} do not divide into {n}-grams"
            )));
        }
        total += (end - start) / n;
    }
    if ngram_indexes.len() != total {
        return Err(ctx.invalid(format!(
            "ngram_indexes has {} entries but the pool holds {total} n-grams",
            ngram_indexes.len()
        )));
    }
    let weights = a.floats("weights").unwrap_or(&[]).to_vec();
    let out_size = TextOp::tfidf_output_size(&ngram_indexes);
    if !weights.is_empty() && weights.len() < out_size {
        return Err(ctx.invalid(format!(
            "weights has {} entries, fewer than the {out_size} output columns",
            weights.len()
        )));
    }
    Ok(TextOp::TfIdfVectorizer {
        mode,
        min_gram_length,
        max_gram_length,
        max_skip_count,
        ngram_counts,
        ngram_indexes,
        pool_int64s,
        pool_strings,
        weights,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attrs::Attrs;
    use crate::convert::Converter;
    use crate::proto::{AttributeProto, NodeProto};
    use crate::tensor_proto::TensorLimits;
    use crate::test_util::{
        int_attr as int, ints_attr as ints, str_attr as string, strings_attr as strings,
    };
    use kiln_ir::Graph;

    fn conv(op_type: &str, attrs: Vec<AttributeProto>) -> Result<Option<Op>> {
        let node = NodeProto {
            op_type: Some(op_type.into()),
            attribute: attrs,
            ..Default::default()
        };
        let a = Attrs::new(&node, "n");
        let mut inputs = vec![Some("x".to_string())];
        let mut graph = Graph::default();
        let mut c = Converter::new(
            20,
            TensorLimits {
                base_dir: None,
                max_tensor_bytes: 1 << 20,
            },
        );
        let mut ctx = NodeCtx {
            opset: 20,
            name: "n",
            attrs: &a,
            inputs: &mut inputs,
            num_outputs: 1,
            graph: &mut graph,
            conv: &mut c,
        };
        convert(op_type, &mut ctx)
    }

    fn text(op_type: &str, attrs: Vec<AttributeProto>) -> TextOp {
        match conv(op_type, attrs) {
            Ok(Some(Op::Text(t))) => t,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn string_ops_parse_with_defaults() {
        assert_eq!(
            text("StringNormalizer", vec![strings("stopwords", &["a"])]),
            TextOp::StringNormalizer {
                case_change: "NONE".into(),
                case_sensitive: false,
                stopwords: vec!["a".into()],
                locale: String::new(),
            }
        );
        assert!(conv(
            "StringNormalizer",
            vec![string("case_change_action", "TITLE")]
        )
        .is_err());
        assert_eq!(
            text(
                "StringSplit",
                vec![string("delimiter", ""), int("maxsplit", -1)]
            ),
            TextOp::StringSplit {
                delimiter: None,
                maxsplit: None
            }
        );
        assert_eq!(
            text(
                "StringSplit",
                vec![string("delimiter", "-"), int("maxsplit", 2)]
            ),
            TextOp::StringSplit {
                delimiter: Some("-".into()),
                maxsplit: Some(2)
            }
        );
        assert_eq!(text("StringConcat", vec![]), TextOp::StringConcat);
        assert!(conv("RegexFullMatch", vec![]).is_err());
        assert_eq!(
            text("ImageDecoder", vec![]),
            TextOp::ImageDecoder {
                pixel_format: "RGB".into()
            }
        );
        assert!(conv("ImageDecoder", vec![string("pixel_format", "RGBA")]).is_err());
        assert!(matches!(conv("Relu", vec![]), Ok(None)));
    }

    fn tfidf_attrs(counts: &[i64], indexes: &[i64], pool: &[i64]) -> Vec<AttributeProto> {
        vec![
            string("mode", "TF"),
            int("min_gram_length", 1),
            int("max_gram_length", 2),
            int("max_skip_count", 0),
            ints("ngram_counts", counts),
            ints("ngram_indexes", indexes),
            ints("pool_int64s", pool),
        ]
    }

    #[test]
    fn tfidf_layout_is_checked() {
        let op = text(
            "TfIdfVectorizer",
            tfidf_attrs(&[0, 2], &[0, 1, 2], &[1, 2, 3, 4]),
        );
        assert!(
            matches!(op, TextOp::TfIdfVectorizer { ref ngram_counts, .. } if ngram_counts == &[0, 2])
        );
        // Three bigram items do not divide into bigrams.
        assert!(conv(
            "TfIdfVectorizer",
            tfidf_attrs(&[0, 1], &[0, 1], &[1, 2, 3, 4])
        )
        .is_err());
        // Wrong number of indexes, counts past the pool, decreasing counts.
        assert!(conv(
            "TfIdfVectorizer",
            tfidf_attrs(&[0, 2], &[0, 1], &[1, 2, 3, 4])
        )
        .is_err());
        assert!(conv(
            "TfIdfVectorizer",
            tfidf_attrs(&[0, 9], &[0, 1], &[1, 2, 3, 4])
        )
        .is_err());
        assert!(conv(
            "TfIdfVectorizer",
            tfidf_attrs(&[2, 0], &[0, 1], &[1, 2, 3, 4])
        )
        .is_err());
        assert!(conv("TfIdfVectorizer", tfidf_attrs(&[0, -1], &[0], &[1])).is_err());
        let mut bad_mode = tfidf_attrs(&[0], &[0], &[1]);
        bad_mode[0] = string("mode", "BM25");
        assert!(conv("TfIdfVectorizer", bad_mode).is_err());
        let mut both = tfidf_attrs(&[0], &[0], &[1]);
        both.push(strings("pool_strings", &["a"]));
        assert!(conv("TfIdfVectorizer", both).is_err());
        let mut short_weights = tfidf_attrs(&[0], &[0, 3], &[1, 2]);
        short_weights.push(AttributeProto {
            name: Some("weights".into()),
            floats: vec![1.0],
            ..Default::default()
        });
        assert!(conv("TfIdfVectorizer", short_weights).is_err());
        let mut no_min = tfidf_attrs(&[0], &[0], &[1]);
        no_min.remove(1);
        assert!(conv("TfIdfVectorizer", no_min).is_err());
    }
}
