//! RE2 patterns on the `regex` crate.
//!
//! The two syntaxes mostly agree; where they differ this module rewrites the
//! pattern so the RE2 meaning is kept:
//! - the Perl classes `\d \w \s` (and negations) and `\b \B` are ASCII-only in
//!   RE2 but Unicode-aware in `regex`; they become explicit ASCII classes;
//! - RE2's `\s` is `[\t\n\f\r ]` (no `\v`);
//! - inside a bracket class, RE2 reads `[` (outside `[:name:]`), `&&`, `--` and
//!   `~~` literally, where `regex` would nest or combine classes;
//! - `\Q...\E` quoting, which `regex` lacks, becomes escaped literals;
//! - `\C` (any byte) cannot match within UTF-8 text and is refused.

use crate::{invalid, unsupported, Result};

/// `\s` in RE2: tab, newline, form feed, carriage return, space.
const SPACE: &str = r"\t\n\x0C\r ";

/// Compiles `pattern` so that `is_match` tells whether a whole string matches.
pub(super) fn full_match_regex(pattern: &str) -> Result<regex::Regex> {
    let translated = translate(pattern)?;
    // Compile alone first, so that a pattern such as `a)|(b` cannot escape the
    // anchoring group below.
    regex::Regex::new(&translated)
        .map_err(|e| invalid!("invalid regular expression {pattern:?}: {e}"))?;
    regex::Regex::new(&format!(r"\A(?:{translated})\z"))
        .map_err(|e| invalid!("invalid regular expression {pattern:?}: {e}"))
}

/// Rewrites an RE2 pattern into `regex` syntax with the same meaning.
pub(super) fn translate(pattern: &str) -> Result<String> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = String::with_capacity(pattern.len() + 16);
    let mut i = 0;
    // Inside a bracket class (RE2 classes do not nest).
    let mut in_class = false;
    while i < chars.len() {
        let c = chars[i];
        if c == '\\' {
            let Some(&e) = chars.get(i + 1) else {
                return Err(invalid!(
                    "invalid regular expression {pattern:?}: trailing backslash"
                ));
            };
            i += 2;
            match e {
                'd' => out.push_str(if in_class { "0-9" } else { "[0-9]" }),
                'D' => out.push_str(if in_class { "[:^digit:]" } else { "[^0-9]" }),
                'w' => out.push_str(if in_class {
                    "0-9A-Za-z_"
                } else {
                    "[0-9A-Za-z_]"
                }),
                'W' => out.push_str(if in_class {
                    "[:^word:]"
                } else {
                    "[^0-9A-Za-z_]"
                }),
                's' => {
                    if in_class {
                        out.push_str(SPACE);
                    } else {
                        out.push('[');
                        out.push_str(SPACE);
                        out.push(']');
                    }
                }
                'S' => {
                    // A nested negated class works in both positions.
                    out.push_str("[^");
                    out.push_str(SPACE);
                    out.push(']');
                }
                'b' if !in_class => out.push_str(r"(?-u:\b)"),
                'B' if !in_class => out.push_str(r"(?-u:\B)"),
                'C' => {
                    return Err(unsupported!(
                        "regular expression {pattern:?}: \\C (any byte) on UTF-8 strings"
                    ))
                }
                'Q' => {
                    // Literal text up to \E or the end of the pattern.
                    while i < chars.len() {
                        if chars[i] == '\\' && chars.get(i + 1) == Some(&'E') {
                            i += 2;
                            break;
                        }
                        push_literal(&mut out, chars[i]);
                        i += 1;
                    }
                }
                'E' => {} // a stray \E is ignored, as in RE2
                _ => {
                    out.push('\\');
                    out.push(e);
                }
            }
            continue;
        }
        if in_class {
            match c {
                ']' => {
                    in_class = false;
                    out.push(']');
                }
                '[' if chars.get(i + 1) == Some(&':') => {
                    // A POSIX class `[:name:]`: the same in both syntaxes.
                    let rest: String = chars[i..].iter().collect();
                    match rest.find(":]") {
                        Some(end) => {
                            out.push_str(&rest[..end + 2]);
                            i += rest[..end + 2].chars().count();
                            continue;
                        }
                        None => out.push_str(r"\["),
                    }
                }
                '[' | '&' | '~' => {
                    out.push('\\');
                    out.push(c);
                }
                '-' if chars.get(i + 1) == Some(&'-') => {
                    // `+--` is the range '+'..'-' in RE2; keep the second dash literal.
                    out.push_str(r"-\-");
                    i += 2;
                    continue;
                }
                _ => out.push(c),
            }
            i += 1;
            continue;
        }
        if c == '[' {
            in_class = true;
            out.push('[');
            i += 1;
            if chars.get(i) == Some(&'^') {
                out.push('^');
                i += 1;
            }
            // A leading `]` is a literal in both syntaxes.
            if chars.get(i) == Some(&']') {
                out.push_str(r"\]");
                i += 1;
            }
            continue;
        }
        out.push(c);
        i += 1;
    }
    Ok(out)
}

fn push_literal(out: &mut String, c: char) {
    if c.is_ascii_punctuation() || c == ' ' {
        out.push('\\');
    }
    out.push(c);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full(p: &str, s: &str) -> bool {
        full_match_regex(p).unwrap().is_match(s)
    }

    #[test]
    fn perl_classes_are_ascii() {
        assert!(full(r"\w+", "abc_09"));
        assert!(!full(r"\w+", "héllo"));
        assert!(full(r"\W", "é"));
        assert!(!full(r"\d", "٣")); // Arabic-Indic digit
        assert!(full(r"[\w.-]+", "a.b-c"));
        assert!(!full(r"[\w]", "é"));
        assert!(full(r"[^\W]", "a"));
        assert!(full(r"\s", "\t"));
        assert!(!full(r"\s", "\u{0b}")); // \v is not \s in RE2
        assert!(!full(r"\s", "\u{a0}"));
        assert!(full(r"[\S]+", "ab"));
        assert!(!full(r"\bé", "é"));
        assert!(full(r"a\b", "a"));
        assert!(full(r".", "é"));
    }

    #[test]
    fn class_literals_and_quoting() {
        assert!(full(r"[a[]+", "a[a"));
        assert!(full(r"[&]+", "&&"));
        assert!(full(r"[a~]+", "~~a"));
        assert!(full(r"[+--]+", ",-+"));
        assert!(full(r"[]a]+", "]a"));
        assert!(full(r"[^]a]", "b"));
        assert!(!full(r"[^]a]", "]"));
        assert!(full(r"[[:alpha:]]+", "abc"));
        assert!(!full(r"\Qa.b*\E+", "a.b*a.b*"));
        assert!(full(r"\Qa.b\E", "a.b"));
        assert!(!full(r"\Qa.b\E", "axb"));
        assert!(full(r"x\Q(", "x("));
        assert_eq!(translate(r"\pL\x41").unwrap(), r"\pL\x41");
    }

    #[test]
    fn anchoring_and_errors() {
        assert!(full("a|ab", "ab"));
        assert!(!full("a", "ba"));
        assert!(!full("a$", "a\n"));
        assert!(full("(?i)straSSe", "STRASSE"));
        assert!(full_match_regex("a)|(b").is_err());
        assert!(full_match_regex("(").is_err());
        assert!(full_match_regex("\\").is_err());
        assert!(full_match_regex(r"\C").is_err());
        assert!(full_match_regex(r"(a)\1").is_err());
    }
}
