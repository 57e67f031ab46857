//! Typed string and image-decoding ops (StringNormalizer, StringSplit, StringConcat, RegexFullMatch, TfIdfVectorizer, ImageDecoder).
//!
//! Each family of ops keeps its enum, its ONNX names and its shape/type rule
//! here; the frontend parses it in `kiln-onnx/src/convert_text.rs` and the kernels
//! live in `kiln-cpu/src/text.rs`.

use crate::{broadcast_shapes, DType, Dim, Shape, Tensor, ValueType};

/// string and image-decoding ops (StringNormalizer, StringSplit, StringConcat, RegexFullMatch, TfIdfVectorizer, ImageDecoder).
///
/// Enumerated attributes keep their ONNX spelling (checked by the frontend), so
/// the family needs no extra public types.
#[derive(Clone, Debug, PartialEq)]
pub enum TextOp {
    /// Input: X (string, `[C]` or `[1, C]`). Drops elements equal to a stopword
    /// (compared case-insensitively unless `case_sensitive`), then changes case.
    /// If every element is dropped the output is `[""]` (`[[""]]` for `[1, C]`).
    StringNormalizer {
        /// "NONE", "LOWER" or "UPPER".
        case_change: String,
        case_sensitive: bool,
        stopwords: Vec<String>,
        /// Kept for messages; case mapping is Unicode's, locale-independent.
        locale: String,
    },
    /// Input: X (string). Outputs: substrings (X's shape + `[max count]`, padded
    /// with ""), lengths (i64, X's shape). `delimiter: None` splits on runs of
    /// whitespace, ignoring leading and trailing whitespace.
    StringSplit {
        delimiter: Option<String>,
        /// `None`: no limit.
        maxsplit: Option<usize>,
    },
    /// Inputs: X, Y (strings), broadcast.
    StringConcat,
    /// Input: X (string). Output: bool, whether each element fully matches the
    /// RE2-syntax `pattern`.
    RegexFullMatch { pattern: String },
    /// Input: X (string, i32 or i64; `[C]` or `[B, C]`). Output: f32 `[out]` or
    /// `[B, out]` with `out = max(ngram_indexes) + 1`. The frontend checks that
    /// `ngram_counts` is non-decreasing and within the pool, that each level's
    /// item count divides by its n-gram length, and that `ngram_indexes` has one
    /// entry per pool n-gram.
    TfIdfVectorizer {
        /// "TF" (counts), "IDF" (weight, or 1, where the count is non-zero) or
        /// "TFIDF" (count times weight, or the count without weights).
        mode: String,
        min_gram_length: usize,
        max_gram_length: usize,
        max_skip_count: usize,
        /// Start offset in the pool of the n-grams of length `i + 1`.
        ngram_counts: Vec<usize>,
        /// Output column of each pool n-gram, in pool order.
        ngram_indexes: Vec<usize>,
        /// Exactly one of the pools is used: the string one when X is strings.
        pool_int64s: Vec<i64>,
        pool_strings: Vec<String>,
        /// Per output column; empty means no weights.
        weights: Vec<f32>,
    },
    /// Input: encoded_stream (u8, 1-D). Output: u8 `[H, W, C]` (C = 3, or 1 for
    /// grayscale). `pixel_format`: "RGB", "BGR" or "Grayscale".
    ImageDecoder { pixel_format: String },
}

fn string_input(types: &[Option<ValueType>], i: usize, what: &str) -> Result<(), String> {
    match types.get(i).and_then(|t| t.as_ref()) {
        Some(t) if t.dtype != DType::String => Err(format!(
            "input {i} ({what}) must be a string tensor, got {}",
            t.dtype
        )),
        _ => Ok(()),
    }
}

fn shape_of(types: &[Option<ValueType>], i: usize) -> Option<Shape> {
    types
        .get(i)
        .and_then(|t| t.as_ref())
        .and_then(|t| t.shape.clone())
}

impl TextOp {
    /// TfIdfVectorizer's row width: the largest n-gram index plus one.
    pub fn tfidf_output_size(ngram_indexes: &[usize]) -> usize {
        ngram_indexes
            .iter()
            .max()
            .map(|m| m.saturating_add(1))
            .unwrap_or(0)
    }

    /// The ONNX operator name.
    pub fn name(&self) -> &'static str {
        match self {
            TextOp::StringNormalizer { .. } => "StringNormalizer",
            TextOp::StringSplit { .. } => "StringSplit",
            TextOp::StringConcat => "StringConcat",
            TextOp::RegexFullMatch { .. } => "RegexFullMatch",
            TextOp::TfIdfVectorizer { .. } => "TfIdfVectorizer",
            TextOp::ImageDecoder { .. } => "ImageDecoder",
        }
    }

    /// Output types from input types (`None`: absent or unknown) and the values of
    /// constant inputs. Returns one entry per node output (`None`: unknown), or a
    /// message saying what is wrong with the inputs.
    pub fn infer(
        &self,
        types: &[Option<ValueType>],
        _consts: &[Option<&Tensor>],
        num_outputs: usize,
    ) -> Result<Vec<Option<ValueType>>, String> {
        let mut out: Vec<Option<ValueType>> = match self {
            TextOp::StringNormalizer { stopwords, .. } => {
                string_input(types, 0, "X")?;
                let shape = match shape_of(types, 0) {
                    Some(s) => {
                        match s.len() {
                            1 | 2 => {}
                            r => {
                                return Err(format!(
                                    "X must have shape [C] or [1, C], got rank {r}"
                                ))
                            }
                        }
                        if s.len() == 2 && matches!(s[0], Dim::Known(d) if d != 1) {
                            return Err(format!(
                                "X must have shape [C] or [1, C], got [{}, {}]",
                                s[0], s[1]
                            ));
                        }
                        let last = s.len() - 1;
                        // Without stopwords nothing is dropped; an empty X still
                        // becomes [""].
                        let width = match &s[last] {
                            Dim::Known(0) => Dim::Known(1),
                            d @ Dim::Known(_) if stopwords.is_empty() => d.clone(),
                            _ => Dim::Unknown,
                        };
                        let mut s2 = s.clone();
                        s2[last] = width;
                        if s2.len() == 2 {
                            s2[0] = Dim::Known(1);
                        }
                        Some(s2)
                    }
                    None => None,
                };
                vec![Some(ValueType::new(DType::String, shape))]
            }
            TextOp::StringSplit { .. } => {
                string_input(types, 0, "X")?;
                let s = shape_of(types, 0);
                let subs = s.clone().map(|mut s| {
                    s.push(Dim::Unknown);
                    s
                });
                vec![
                    Some(ValueType::new(DType::String, subs)),
                    Some(ValueType::new(DType::I64, s)),
                ]
            }
            TextOp::StringConcat => {
                string_input(types, 0, "X")?;
                string_input(types, 1, "Y")?;
                let shape = match (shape_of(types, 0), shape_of(types, 1)) {
                    (Some(a), Some(b)) => Some(broadcast_shapes(&a, &b).ok_or_else(|| {
                        format!(
                            "shapes {} and {} cannot be broadcast together",
                            crate::format_shape(&a),
                            crate::format_shape(&b)
                        )
                    })?),
                    _ => None,
                };
                vec![Some(ValueType::new(DType::String, shape))]
            }
            TextOp::RegexFullMatch { .. } => {
                string_input(types, 0, "X")?;
                vec![Some(ValueType::new(DType::Bool, shape_of(types, 0)))]
            }
            TextOp::TfIdfVectorizer { ngram_indexes, .. } => {
                if let Some(t) = types.first().and_then(|t| t.as_ref()) {
                    if !matches!(t.dtype, DType::String | DType::I32 | DType::I64) {
                        return Err(format!(
                            "X must be a string, i32 or i64 tensor, got {}",
                            t.dtype
                        ));
                    }
                }
                let width = Dim::Known(TextOp::tfidf_output_size(ngram_indexes));
                let shape = match shape_of(types, 0) {
                    Some(s) => match s.len() {
                        0 | 1 => Some(vec![width]),
                        2 => Some(vec![s[0].clone(), width]),
                        r => return Err(format!("X must have rank 1 or 2, got rank {r}")),
                    },
                    None => None,
                };
                vec![Some(ValueType::new(DType::F32, shape))]
            }
            TextOp::ImageDecoder { pixel_format } => {
                if let Some(t) = types.first().and_then(|t| t.as_ref()) {
                    if t.dtype != DType::U8 {
                        return Err(format!(
                            "encoded_stream must be a u8 tensor, got {}",
                            t.dtype
                        ));
                    }
                }
                let channels = if pixel_format == "Grayscale" { 1 } else { 3 };
                vec![Some(ValueType::new(
                    DType::U8,
                    Some(vec![Dim::Unknown, Dim::Unknown, Dim::Known(channels)]),
                ))]
            }
        };
        out.resize(num_outputs.max(out.len()), None);
        out.truncate(num_outputs);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::known_shape;

    fn st(dims: &[usize]) -> Option<ValueType> {
        Some(ValueType::new(DType::String, Some(known_shape(dims))))
    }

    #[test]
    fn string_ops_types() {
        let norm = TextOp::StringNormalizer {
            case_change: "UPPER".into(),
            case_sensitive: false,
            stopwords: vec!["a".into()],
            locale: String::new(),
        };
        let out = norm.infer(&[st(&[1, 4])], &[None], 1).unwrap();
        assert_eq!(
            out[0],
            Some(ValueType::new(
                DType::String,
                Some(vec![Dim::Known(1), Dim::Unknown])
            ))
        );
        assert!(norm.infer(&[st(&[2, 4])], &[None], 1).is_err());
        assert!(norm.infer(&[st(&[1, 1, 4])], &[None], 1).is_err());
        let plain = TextOp::StringNormalizer {
            case_change: "NONE".into(),
            case_sensitive: true,
            stopwords: vec![],
            locale: String::new(),
        };
        let out = plain.infer(&[st(&[3])], &[None], 1).unwrap();
        assert_eq!(out[0], st(&[3]));
        let out = plain.infer(&[st(&[0])], &[None], 1).unwrap();
        assert_eq!(out[0], st(&[1]));

        let split = TextOp::StringSplit {
            delimiter: None,
            maxsplit: None,
        };
        let out = split.infer(&[st(&[2, 3])], &[None], 2).unwrap();
        assert_eq!(
            out[1],
            Some(ValueType::new(DType::I64, Some(known_shape(&[2, 3]))))
        );
        assert_eq!(
            out[0].as_ref().unwrap().shape.as_ref().unwrap()[2],
            Dim::Unknown
        );

        let out = TextOp::StringConcat
            .infer(&[st(&[3]), st(&[1])], &[None, None], 1)
            .unwrap();
        assert_eq!(out[0], st(&[3]));
        assert!(TextOp::StringConcat
            .infer(&[st(&[3]), st(&[2])], &[None, None], 1)
            .is_err());
        let f = Some(ValueType::new(DType::F32, Some(known_shape(&[3]))));
        assert!(TextOp::StringConcat
            .infer(&[f.clone(), st(&[3])], &[None, None], 1)
            .is_err());
        let re = TextOp::RegexFullMatch {
            pattern: "a".into(),
        };
        assert_eq!(
            re.infer(&[st(&[2, 0])], &[None], 1).unwrap()[0],
            Some(ValueType::new(DType::Bool, Some(known_shape(&[2, 0]))))
        );
        assert!(re.infer(&[f], &[None], 1).is_err());
    }

    #[test]
    fn tfidf_and_image_types() {
        let op = TextOp::TfIdfVectorizer {
            mode: "TF".into(),
            min_gram_length: 1,
            max_gram_length: 2,
            max_skip_count: 0,
            ngram_counts: vec![0, 2],
            ngram_indexes: vec![0, 3, 1],
            pool_int64s: vec![1, 2, 3, 4],
            pool_strings: vec![],
            weights: vec![],
        };
        assert_eq!(TextOp::tfidf_output_size(&[0, 3, 1]), 4);
        assert_eq!(TextOp::tfidf_output_size(&[]), 0);
        let x = Some(ValueType::new(DType::I32, Some(known_shape(&[5, 7]))));
        assert_eq!(
            op.infer(&[x], &[None], 1).unwrap()[0],
            Some(ValueType::new(DType::F32, Some(known_shape(&[5, 4]))))
        );
        let bad = Some(ValueType::new(DType::F32, Some(known_shape(&[5]))));
        assert!(op.infer(&[bad], &[None], 1).is_err());

        let img = TextOp::ImageDecoder {
            pixel_format: "Grayscale".into(),
        };
        let x = Some(ValueType::new(DType::U8, Some(known_shape(&[100]))));
        let out = img.infer(&[x], &[None], 1).unwrap();
        assert_eq!(
            out[0].as_ref().unwrap().shape.as_ref().unwrap()[2],
            Dim::Known(1)
        );
        assert_eq!(img.name(), "ImageDecoder");
    }
}
