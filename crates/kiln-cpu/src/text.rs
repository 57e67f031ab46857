//! Kernels for the `TextOp` family (see `kiln_ir::op_text`): string cleaning,
//! splitting, concatenation, regular-expression matching, n-gram counting
//! (TfIdfVectorizer) and image decoding.

mod image;
mod re2;

use crate::util::{broadcast_indices, broadcast_shape, tensor};
use crate::{invalid, required, unsupported, Result};
use kiln_ir::{checked_numel, DType, Tensor, TensorData, TextOp};
use std::collections::HashMap;
use std::hash::Hash;

/// Outputs larger than this many elements are refused rather than allocated.
const MAX_OUTPUT_ELEMENTS: usize = 1 << 32;

/// Runs one op of the family on its present inputs.
pub fn run(op: &TextOp, inputs: &[Option<&Tensor>], num_outputs: usize) -> Result<Vec<Tensor>> {
    let _ = num_outputs;
    match op {
        TextOp::StringNormalizer {
            case_change,
            case_sensitive,
            stopwords,
            ..
        } => Ok(vec![string_normalizer(
            required(inputs, 0, "X")?,
            case_change,
            *case_sensitive,
            stopwords,
        )?]),
        TextOp::StringSplit {
            delimiter,
            maxsplit,
        } => string_split(required(inputs, 0, "X")?, delimiter.as_deref(), *maxsplit),
        TextOp::StringConcat => Ok(vec![string_concat(
            required(inputs, 0, "X")?,
            required(inputs, 1, "Y")?,
        )?]),
        TextOp::RegexFullMatch { pattern } => {
            Ok(vec![regex_full_match(required(inputs, 0, "X")?, pattern)?])
        }
        TextOp::TfIdfVectorizer {
            mode,
            min_gram_length,
            max_gram_length,
            max_skip_count,
            ngram_counts,
            ngram_indexes,
            pool_int64s,
            pool_strings,
            weights,
        } => {
            let cfg = TfIdf {
                mode,
                min_gram: *min_gram_length,
                max_gram: *max_gram_length,
                max_skip: *max_skip_count,
                ngram_counts,
                ngram_indexes,
                weights,
            };
            Ok(vec![tfidf(
                &cfg,
                required(inputs, 0, "X")?,
                pool_int64s,
                pool_strings,
            )?])
        }
        TextOp::ImageDecoder { pixel_format } => Ok(vec![image::decode(
            required(inputs, 0, "encoded_stream")?,
            pixel_format,
        )?]),
    }
}

fn strings<'a>(t: &'a Tensor, what: &str) -> Result<&'a [String]> {
    t.as_slice::<String>()
        .ok_or_else(|| invalid!("{what} must be a string tensor, got {}", t.dtype()))
}

fn output_len(shape: &[usize]) -> Result<usize> {
    match checked_numel(shape) {
        Some(n) if n <= MAX_OUTPUT_ELEMENTS => Ok(n),
        _ => Err(invalid!(
            "output shape {shape:?} is too large (limit {MAX_OUTPUT_ELEMENTS} elements)"
        )),
    }
}

fn change_case(s: &str, case_change: &str) -> Result<String> {
    Ok(match case_change {
        "NONE" => s.to_string(),
        "LOWER" => s.to_lowercase(),
        "UPPER" => s.to_uppercase(),
        other => return Err(invalid!("unknown case_change_action '{other}'")),
    })
}

/// StringNormalizer: drop stopword elements, then change case. X is `[C]` or
/// `[1, C]`; when nothing is left the output is a single "".
fn string_normalizer(
    x: &Tensor,
    case_change: &str,
    case_sensitive: bool,
    stopwords: &[String],
) -> Result<Tensor> {
    let v = strings(x, "X")?;
    let two_d = match x.shape() {
        [_] => false,
        [1, _] => true,
        s => return Err(invalid!("X must have shape [C] or [1, C], got {s:?}")),
    };
    let fold = |s: &str| s.to_lowercase();
    let stops: std::collections::HashSet<String> = stopwords
        .iter()
        .map(|w| if case_sensitive { w.clone() } else { fold(w) })
        .collect();
    let mut out = Vec::with_capacity(v.len());
    for s in v {
        let is_stop = if case_sensitive {
            stops.contains(s)
        } else {
            stops.contains(&fold(s))
        };
        if !is_stop {
            out.push(change_case(s, case_change)?);
        }
    }
    if out.is_empty() {
        out.push(String::new());
    }
    let n = out.len();
    let shape = if two_d { vec![1, n] } else { vec![n] };
    tensor(shape, TensorData::String(out))
}

/// Whitespace as Python's `str.split()` sees it: Unicode White_Space plus the
/// ASCII information separators 0x1C..0x1F.
fn is_split_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `s.split(None, maxsplit)`: runs of whitespace separate, leading and
/// trailing whitespace is dropped (the unsplit remainder keeps its trailing part).
fn split_whitespace(s: &str, maxsplit: Option<usize>) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = s.trim_start_matches(is_split_space);
    while !rest.is_empty() {
        if maxsplit.is_some_and(|m| out.len() >= m) {
            out.push(rest);
            break;
        }
        match rest.find(is_split_space) {
            Some(i) => {
                out.push(&rest[..i]);
                rest = rest[i..].trim_start_matches(is_split_space);
            }
            None => {
                out.push(rest);
                break;
            }
        }
    }
    out
}

/// Python's `s.split(delimiter, maxsplit)` for a non-empty delimiter.
fn split_delimited<'a>(s: &'a str, delimiter: &str, maxsplit: Option<usize>) -> Vec<&'a str> {
    match maxsplit {
        Some(m) => s.splitn(m.saturating_add(1), delimiter).collect(),
        None => s.split(delimiter).collect(),
    }
}

/// StringSplit: substrings padded with "" to the longest split, and the count
/// of each.
fn string_split(
    x: &Tensor,
    delimiter: Option<&str>,
    maxsplit: Option<usize>,
) -> Result<Vec<Tensor>> {
    let v = strings(x, "X")?;
    let parts: Vec<Vec<&str>> = v
        .iter()
        .map(|s| match delimiter {
            Some(d) if !d.is_empty() => split_delimited(s, d, maxsplit),
            _ => split_whitespace(s, maxsplit),
        })
        .collect();
    let width = parts.iter().map(Vec::len).max().unwrap_or(0);
    let mut shape = x.shape().to_vec();
    shape.push(width);
    let n = output_len(&shape)?;
    let mut subs = Vec::with_capacity(n);
    let mut lengths = Vec::with_capacity(parts.len());
    for p in &parts {
        subs.extend(p.iter().map(|s| s.to_string()));
        subs.resize(subs.len() + (width - p.len()), String::new());
        lengths.push(p.len() as i64);
    }
    Ok(vec![
        tensor(shape, TensorData::String(subs))?,
        tensor(x.shape().to_vec(), TensorData::I64(lengths))?,
    ])
}

/// StringConcat: element-wise `x + y` with broadcasting.
fn string_concat(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let a = strings(x, "X")?;
    let b = strings(y, "Y")?;
    let shape = broadcast_shape(x.shape(), y.shape())?;
    output_len(&shape)?;
    let ia = broadcast_indices(x.shape(), &shape);
    let ib = broadcast_indices(y.shape(), &shape);
    let out: Vec<String> = ia
        .iter()
        .zip(&ib)
        .map(|(&i, &j)| {
            let (s, t) = (&a[i], &b[j]);
            let mut r = String::with_capacity(s.len() + t.len());
            r.push_str(s);
            r.push_str(t);
            r
        })
        .collect();
    tensor(shape, TensorData::String(out))
}

/// RegexFullMatch: whether each element matches the RE2 pattern as a whole.
fn regex_full_match(x: &Tensor, pattern: &str) -> Result<Tensor> {
    let v = strings(x, "X")?;
    let re = re2::full_match_regex(pattern)?;
    let out: Vec<bool> = v.iter().map(|s| re.is_match(s)).collect();
    tensor(x.shape().to_vec(), TensorData::Bool(out))
}

/// TfIdfVectorizer attributes as the kernel reads them.
struct TfIdf<'a> {
    mode: &'a str,
    min_gram: usize,
    max_gram: usize,
    max_skip: usize,
    ngram_counts: &'a [usize],
    ngram_indexes: &'a [usize],
    weights: &'a [f32],
}

impl TfIdf<'_> {
    /// Maps each pool n-gram whose length is in `[min_gram, max_gram]` to its
    /// output column. A repeated n-gram keeps its last column.
    fn table<K: Eq + Hash + Clone>(&self, pool: &[K]) -> Result<HashMap<Vec<K>, usize>> {
        let mut map = HashMap::new();
        let mut ordinal = 0usize;
        for (level, &start) in self.ngram_counts.iter().enumerate() {
            let n = level + 1;
            let end = self
                .ngram_counts
                .get(level + 1)
                .copied()
                .unwrap_or(pool.len());
            let items = pool
                .get(start..end)
                .ok_or_else(|| invalid!("ngram_counts does not fit the pool"))?;
            for gram in items.chunks_exact(n) {
                let col = *self
                    .ngram_indexes
                    .get(ordinal)
                    .ok_or_else(|| invalid!("ngram_indexes is shorter than the pool"))?;
                if (self.min_gram..=self.max_gram).contains(&n) {
                    map.insert(gram.to_vec(), col);
                }
                ordinal += 1;
            }
        }
        Ok(map)
    }

    /// Adds the pool n-gram counts of one row to `counts` (one output row).
    fn count_row<K: Eq + Hash + Clone>(
        &self,
        row: &[K],
        table: &HashMap<Vec<K>, usize>,
        counts: &mut [u64],
    ) {
        let c = row.len();
        let mut key: Vec<K> = Vec::with_capacity(self.max_gram.min(c));
        let mut bump = |key: &[K]| {
            if let Some(&col) = table.get(key) {
                if let Some(slot) = counts.get_mut(col) {
                    *slot += 1;
                }
            }
        };
        for n in self.min_gram..=self.max_gram.min(c) {
            if n == 1 {
                // Unigrams do not depend on the skip distance: counted once.
                for item in row {
                    key.clear();
                    key.push(item.clone());
                    bump(&key);
                }
                continue;
            }
            // Skip distance d: items i, i + d, ..., i + (n - 1) d.
            for d in 1..=self.max_skip.saturating_add(1) {
                let span = match (n - 1).checked_mul(d) {
                    Some(s) if s < c => s,
                    _ => break,
                };
                for i in 0..c - span {
                    key.clear();
                    key.extend((0..n).map(|j| row[i + j * d].clone()));
                    bump(&key);
                }
            }
        }
    }
}

/// TfIdfVectorizer over `[C]` (or a scalar) or `[B, C]` input.
fn tfidf(cfg: &TfIdf, x: &Tensor, pool_ints: &[i64], pool_strings: &[String]) -> Result<Tensor> {
    let (rows, c, batched) = match x.shape() {
        [] => (1, 1, false),
        [c] => (1, *c, false),
        [b, c] => (*b, *c, true),
        s => return Err(invalid!("X must have shape [C] or [B, C], got {s:?}")),
    };
    let width = TextOp::tfidf_output_size(cfg.ngram_indexes);
    let out_shape = if batched {
        vec![rows, width]
    } else {
        vec![width]
    };
    let n = output_len(&out_shape)?;
    let mut counts = vec![0u64; n];
    if c > 0 && width > 0 {
        match x.data() {
            TensorData::String(v) => {
                if !pool_ints.is_empty() {
                    return Err(invalid!("X is strings but the n-gram pool is integers"));
                }
                let pool: Vec<&str> = pool_strings.iter().map(String::as_str).collect();
                let table = cfg.table(&pool)?;
                for (r, out) in counts.chunks_exact_mut(width).enumerate().take(rows) {
                    let row: Vec<&str> = v[r * c..(r + 1) * c].iter().map(String::as_str).collect();
                    cfg.count_row(&row, &table, out);
                }
            }
            TensorData::I32(_) | TensorData::I64(_) => {
                if !pool_strings.is_empty() {
                    return Err(invalid!("X is integers but the n-gram pool is strings"));
                }
                let v = x.to_i64_vec().map_err(|e| invalid!("{e}"))?;
                let table = cfg.table(pool_ints)?;
                for (r, out) in counts.chunks_exact_mut(width).enumerate().take(rows) {
                    cfg.count_row(&v[r * c..(r + 1) * c], &table, out);
                }
            }
            d => {
                return Err(invalid!(
                    "X must be a string, i32 or i64 tensor, got {}",
                    d.dtype()
                ))
            }
        }
    } else if !matches!(x.dtype(), DType::String | DType::I32 | DType::I64) {
        return Err(invalid!(
            "X must be a string, i32 or i64 tensor, got {}",
            x.dtype()
        ));
    }
    let weight = |i: usize| -> Result<f32> {
        if cfg.weights.is_empty() {
            return Ok(1.0);
        }
        let col = i % width.max(1);
        cfg.weights
            .get(col)
            .copied()
            .ok_or_else(|| invalid!("weights has no entry for output column {col}"))
    };
    let out = counts
        .iter()
        .enumerate()
        .map(|(i, &k)| {
            Ok(match cfg.mode {
                "TF" => k as f32,
                "IDF" => {
                    if k > 0 {
                        weight(i)?
                    } else {
                        0.0
                    }
                }
                "TFIDF" => k as f32 * weight(i)?,
                m => return Err(unsupported!("TfIdfVectorizer mode '{m}'")),
            })
        })
        .collect::<Result<Vec<f32>>>()?;
    tensor(out_shape, TensorData::F32(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(shape: &[usize], v: &[&str]) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v.iter().map(|s| s.to_string()).collect()).unwrap()
    }

    fn sv(t: &Tensor) -> Vec<&str> {
        t.as_slice::<String>()
            .unwrap()
            .iter()
            .map(String::as_str)
            .collect()
    }

    fn run1(op: &TextOp, inputs: &[&Tensor]) -> Result<Vec<Tensor>> {
        let ins: Vec<Option<&Tensor>> = inputs.iter().map(|t| Some(*t)).collect();
        run(op, &ins, 2)
    }

    fn normalizer(case: &str, sensitive: bool, stops: &[&str]) -> TextOp {
        TextOp::StringNormalizer {
            case_change: case.into(),
            case_sensitive: sensitive,
            stopwords: stops.iter().map(|s| s.to_string()).collect(),
            locale: "en_US".into(),
        }
    }

    #[test]
    fn normalizer_drops_stopwords_and_changes_case() {
        let x = st(&[4], &["monday", "tuesday", "Monday", "Straße"]);
        let out = run1(&normalizer("UPPER", true, &["monday"]), &[&x]).unwrap();
        assert_eq!(out[0].shape(), &[3]);
        assert_eq!(sv(&out[0]), ["TUESDAY", "MONDAY", "STRASSE"]);
        let out = run1(&normalizer("LOWER", false, &["MONDAY"]), &[&x]).unwrap();
        assert_eq!(sv(&out[0]), ["tuesday", "straße"]);
        let x2 = st(&[1, 3], &["A", "b", "a"]);
        let out = run1(&normalizer("NONE", false, &["a"]), &[&x2]).unwrap();
        assert_eq!(out[0].shape(), &[1, 1]);
        assert_eq!(sv(&out[0]), ["b"]);
    }

    #[test]
    fn normalizer_all_dropped_and_bad_shapes() {
        let x = st(&[2], &["monday", "monday"]);
        let out = run1(&normalizer("UPPER", true, &["monday"]), &[&x]).unwrap();
        assert_eq!(out[0].shape(), &[1]);
        assert_eq!(sv(&out[0]), [""]);
        let x = st(&[1, 2], &["a", "A"]);
        let out = run1(&normalizer("NONE", false, &["a"]), &[&x]).unwrap();
        assert_eq!(out[0].shape(), &[1, 1]);
        assert_eq!(sv(&out[0]), [""]);
        let empty = st(&[0], &[]);
        let out = run1(&normalizer("NONE", true, &[]), &[&empty]).unwrap();
        assert_eq!(out[0].shape(), &[1]);
        let bad = st(&[2, 1], &["a", "b"]);
        assert!(run1(&normalizer("NONE", true, &[]), &[&bad]).is_err());
        let scalar = st(&[], &["a"]);
        assert!(run1(&normalizer("NONE", true, &[]), &[&scalar]).is_err());
        let nums = Tensor::vector(vec![1.0f32]);
        assert!(run1(&normalizer("NONE", true, &[]), &[&nums]).is_err());
        assert!(run1(&normalizer("TITLE", true, &[]), &[&st(&[1], &["a"])]).is_err());
    }

    fn split(delim: Option<&str>, maxsplit: Option<usize>) -> TextOp {
        TextOp::StringSplit {
            delimiter: delim.map(str::to_string),
            maxsplit,
        }
    }

    #[test]
    fn split_with_delimiter() {
        let x = st(&[2], &["o-n-n--x-", "o-n----nx"]);
        let out = run1(&split(Some("-"), None), &[&x]).unwrap();
        assert_eq!(out[0].shape(), &[2, 6]);
        assert_eq!(
            sv(&out[0]),
            ["o", "n", "n", "", "x", "", "o", "n", "", "", "", "nx"]
        );
        assert_eq!(out[1].as_slice::<i64>().unwrap(), &[6, 6]);
        // Multi-character delimiter, padding, and the empty string (one part).
        let x = st(&[3], &["a<>b<>c", "", "x"]);
        let out = run1(&split(Some("<>"), None), &[&x]).unwrap();
        assert_eq!(out[0].shape(), &[3, 3]);
        assert_eq!(sv(&out[0]), ["a", "b", "c", "", "", "", "x", "", ""]);
        assert_eq!(out[1].as_slice::<i64>().unwrap(), &[3, 1, 1]);
        // maxsplit keeps the remainder whole.
        let out = run1(&split(Some("."), Some(1)), &[&st(&[1], &["a.b.c"])]).unwrap();
        assert_eq!(sv(&out[0]), ["a", "b.c"]);
        let out = run1(&split(Some("."), Some(0)), &[&st(&[1], &["a.b"])]).unwrap();
        assert_eq!(sv(&out[0]), ["a.b"]);
    }

    #[test]
    fn split_on_whitespace() {
        let x = st(
            &[2, 2],
            &[
                "hello world",
                "  a\t b\n",
                "o n n x",
                "the quick brown fox ",
            ],
        );
        let out = run1(&split(None, Some(2)), &[&x]).unwrap();
        assert_eq!(out[0].shape(), &[2, 2, 3]);
        assert_eq!(
            sv(&out[0]),
            [
                "hello",
                "world",
                "",
                "a",
                "b",
                "",
                "o",
                "n",
                "n x",
                "the",
                "quick",
                "brown fox "
            ]
        );
        assert_eq!(out[1].shape(), &[2, 2]);
        assert_eq!(out[1].as_slice::<i64>().unwrap(), &[2, 2, 3, 3]);
        // Empty and blank strings have no parts.
        let out = run1(&split(None, None), &[&st(&[2], &["", "   "])]).unwrap();
        assert_eq!(out[0].shape(), &[2, 0]);
        assert_eq!(out[1].as_slice::<i64>().unwrap(), &[0, 0]);
        assert_eq!(split_whitespace("a\u{1f}b\u{a0}c", None), ["a", "b", "c"]);
        assert_eq!(split_whitespace(" a b  ", Some(1)), ["a", "b  "]);
    }

    #[test]
    fn split_empty_tensor_and_scalar() {
        let out = run1(&split(None, None), &[&st(&[0], &[])]).unwrap();
        assert_eq!(out[0].shape(), &[0, 0]);
        assert_eq!(out[1].shape(), &[0]);
        let out = run1(&split(Some(","), None), &[&st(&[], &["a,b"])]).unwrap();
        assert_eq!(out[0].shape(), &[2]);
        assert_eq!(out[1].shape(), &[] as &[usize]);
        assert!(run1(&split(None, None), &[&Tensor::vector(vec![1i64])]).is_err());
    }

    #[test]
    fn concat_broadcasts() {
        let x = st(&[3], &["cat", "dog", "的"]);
        let y = st(&[1], &["s"]);
        let out = run1(&TextOp::StringConcat, &[&x, &y]).unwrap();
        assert_eq!(sv(&out[0]), ["cats", "dogs", "的s"]);
        let a = st(&[2, 1], &["a", "b"]);
        let b = st(&[3], &["1", "2", ""]);
        let out = run1(&TextOp::StringConcat, &[&a, &b]).unwrap();
        assert_eq!(out[0].shape(), &[2, 3]);
        assert_eq!(sv(&out[0]), ["a1", "a2", "a", "b1", "b2", "b"]);
        let out = run1(&TextOp::StringConcat, &[&st(&[], &["x"]), &st(&[], &["y"])]).unwrap();
        assert_eq!(out[0].shape(), &[] as &[usize]);
        let out = run1(&TextOp::StringConcat, &[&st(&[0], &[]), &y]).unwrap();
        assert_eq!(out[0].shape(), &[0]);
        assert!(run1(&TextOp::StringConcat, &[&x, &st(&[2], &["a", "b"])]).is_err());
        assert!(run1(&TextOp::StringConcat, &[&x, &Tensor::vector(vec![1i64])]).is_err());
        assert!(run(&TextOp::StringConcat, &[Some(&x)], 1).is_err());
    }

    fn re(p: &str) -> TextOp {
        TextOp::RegexFullMatch {
            pattern: p.to_string(),
        }
    }

    #[test]
    fn regex_full_match_cases() {
        let x = st(
            &[3],
            &["www.google.com", "www.facebook.com", "www.bbc.co.uk"],
        );
        let out = run1(&re(r"www\.[\w.-]+\.\bcom\b"), &[&x]).unwrap();
        assert_eq!(out[0].as_slice::<bool>().unwrap(), &[true, true, false]);
        let x = st(
            &[2, 2],
            &[
                "account@gmail.com",
                "account@hotmail.com",
                "not email",
                "account2@yahoo.com",
            ],
        );
        let out = run1(&re(r"(\W|^)[\w.\-]{0,25}@(yahoo|gmail)\.com(\W|$)"), &[&x]).unwrap();
        assert_eq!(out[0].shape(), &[2, 2]);
        assert_eq!(
            out[0].as_slice::<bool>().unwrap(),
            &[true, false, false, true]
        );
        // Full match, not search; alternation must cover the whole string.
        let x = st(&[3], &["ab", "xab", "a"]);
        let out = run1(&re("a|ab"), &[&x]).unwrap();
        assert_eq!(out[0].as_slice::<bool>().unwrap(), &[true, false, true]);
        let out = run1(&re("a"), &[&st(&[2, 0], &[])]).unwrap();
        assert_eq!(out[0].shape(), &[2, 0]);
        assert!(run1(&re("a)|(b"), &[&x]).is_err());
        assert!(run1(&re("("), &[&x]).is_err());
        assert!(run1(&re("a"), &[&Tensor::vector(vec![1i64])]).is_err());
    }

    #[allow(clippy::too_many_arguments)]
    fn tf(
        mode: &str,
        min: usize,
        max: usize,
        skip: usize,
        counts: &[usize],
        indexes: &[usize],
        ints: &[i64],
        strs: &[&str],
        weights: &[f32],
    ) -> TextOp {
        TextOp::TfIdfVectorizer {
            mode: mode.into(),
            min_gram_length: min,
            max_gram_length: max,
            max_skip_count: skip,
            ngram_counts: counts.to_vec(),
            ngram_indexes: indexes.to_vec(),
            pool_int64s: ints.to_vec(),
            pool_strings: strs.iter().map(|s| s.to_string()).collect(),
            weights: weights.to_vec(),
        }
    }

    const POOL: [i64; 10] = [2, 3, 5, 4, 5, 6, 7, 8, 6, 7];
    const IDX: [usize; 7] = [0, 1, 2, 3, 4, 5, 6];

    fn f32s(t: &Tensor) -> Vec<f32> {
        t.as_slice::<f32>().unwrap().to_vec()
    }

    #[test]
    fn tfidf_bigrams_and_skips() {
        let x = Tensor::vector(vec![1i32, 1, 3, 3, 3, 7, 8, 6, 7, 5, 6, 8]);
        let op = tf("TF", 2, 2, 0, &[0, 4], &IDX, &POOL, &[], &[]);
        assert_eq!(
            f32s(&run1(&op, &[&x]).unwrap()[0]),
            [0., 0., 0., 0., 1., 1., 1.]
        );
        let op = tf("TF", 2, 2, 5, &[0, 4], &IDX, &POOL, &[], &[]);
        assert_eq!(
            f32s(&run1(&op, &[&x]).unwrap()[0]),
            [0., 0., 0., 0., 1., 3., 1.]
        );
        // Unigrams are counted once whatever the skip count.
        let op = tf("TF", 1, 2, 5, &[0, 4], &IDX, &POOL, &[], &[]);
        assert_eq!(
            f32s(&run1(&op, &[&x]).unwrap()[0]),
            [0., 3., 1., 0., 1., 3., 1.]
        );
        // No unigram level in the pool.
        let op = tf(
            "TF",
            2,
            2,
            0,
            &[0, 0],
            &[0, 1, 2],
            &[5, 6, 7, 8, 6, 7],
            &[],
            &[],
        );
        assert_eq!(f32s(&run1(&op, &[&x]).unwrap()[0]), [1., 1., 1.]);
    }

    #[test]
    fn tfidf_batches_modes_and_strings() {
        let x = Tensor::from_vec(vec![2, 6], vec![1i64, 1, 3, 3, 3, 7, 8, 6, 7, 5, 6, 8]).unwrap();
        let op = tf("TF", 2, 2, 0, &[0, 4], &IDX, &POOL, &[], &[]);
        let out = run1(&op, &[&x]).unwrap();
        assert_eq!(out[0].shape(), &[2, 7]);
        assert_eq!(
            f32s(&out[0]),
            [0., 0., 0., 0., 0., 0., 0., 0., 0., 0., 0., 1., 0., 1.]
        );
        // Output columns come from ngram_indexes; weights per column.
        let x = st(&[5], &["a", "b", "a", "c", "a"]);
        let w = [0.5, 2.0, 10.0];
        let op = tf(
            "TFIDF",
            1,
            1,
            0,
            &[0],
            &[2, 0, 1],
            &[],
            &["a", "b", "z"],
            &w,
        );
        assert_eq!(f32s(&run1(&op, &[&x]).unwrap()[0]), [0.5, 0.0, 30.0]);
        let op = tf("IDF", 1, 1, 0, &[0], &[2, 0, 1], &[], &["a", "b", "z"], &w);
        assert_eq!(f32s(&run1(&op, &[&x]).unwrap()[0]), [0.5, 0.0, 10.0]);
        let op = tf("IDF", 1, 1, 0, &[0], &[2, 0, 1], &[], &["a", "b", "z"], &[]);
        assert_eq!(f32s(&run1(&op, &[&x]).unwrap()[0]), [1.0, 0.0, 1.0]);
        let op = tf(
            "TFIDF",
            1,
            1,
            0,
            &[0],
            &[2, 0, 1],
            &[],
            &["a", "b", "z"],
            &[],
        );
        assert_eq!(f32s(&run1(&op, &[&x]).unwrap()[0]), [1.0, 0.0, 3.0]);
    }

    #[test]
    fn tfidf_edge_cases() {
        let op = tf("TF", 1, 1, 0, &[0], &[0, 1], &[4, 5], &[], &[]);
        let empty = Tensor::from_vec(vec![0], Vec::<i64>::new()).unwrap();
        let out = run1(&op, &[&empty]).unwrap();
        assert_eq!(out[0].shape(), &[2]);
        assert_eq!(f32s(&out[0]), [0.0, 0.0]);
        let empty2 = Tensor::from_vec(vec![3, 0], Vec::<i32>::new()).unwrap();
        assert_eq!(run1(&op, &[&empty2]).unwrap()[0].shape(), &[3, 2]);
        let scalar = Tensor::scalar(5i64);
        assert_eq!(f32s(&run1(&op, &[&scalar]).unwrap()[0]), [0.0, 1.0]);
        // Long n-grams and huge skips on a short row stay in bounds.
        let op = tf(
            "TF",
            3,
            3,
            usize::MAX,
            &[0, 0, 0],
            &[0],
            &[1, 1, 1],
            &[],
            &[],
        );
        let x = Tensor::vector(vec![1i64, 1]);
        assert_eq!(f32s(&run1(&op, &[&x]).unwrap()[0]), [0.0]);
        let x = Tensor::vector(vec![1i64, 1, 1, 1, 1]);
        // d = 1: 3 windows, d = 2: 1 window.
        assert_eq!(f32s(&run1(&op, &[&x]).unwrap()[0]), [4.0]);
        // Bad inputs.
        let rank3 = Tensor::from_vec(vec![1, 1, 1], vec![1i64]).unwrap();
        assert!(run1(&op, &[&rank3]).is_err());
        assert!(run1(&op, &[&Tensor::vector(vec![1.0f32])]).is_err());
        assert!(run1(&op, &[&st(&[1], &["a"])]).is_err());
        let huge = tf("TF", 1, 1, 0, &[0], &[usize::MAX - 1], &[1], &[], &[]);
        assert!(run1(&huge, &[&Tensor::vector(vec![1i64])]).is_err());
    }
}
