//! The `tojson` filter as transformers defines it for chat templates: Python's
//! `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`. Tool
//! schemas and arguments are serialized into prompts with it, so the exact spelling (separators,
//! float repr, no HTML escaping, raw non-ASCII) is what the model saw in training.

use minijinja::value::{from_args, Kwargs, Rest, Value, ValueKind, ValueOrKwargs};
use minijinja::{Error, ErrorKind};

/// Nesting beyond this is refused rather than risking the stack on hostile input.
const MAX_DEPTH: usize = 256;

/// The `json.dumps` options HF's `tojson` forwards.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct DumpOptions {
    pub ensure_ascii: bool,
    /// `None`: single line. `Some(s)`: one item per line, each level indented by `s`.
    pub indent: Option<String>,
    pub item_sep: String,
    pub key_sep: String,
    pub sort_keys: bool,
}

/// HF's `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`;
/// arguments may come positionally or by keyword, as in Python.
pub(super) fn tojson(value: &Value, args: Rest<ValueOrKwargs>) -> Result<Value, Error> {
    // minijinja functions take at most five parameters, so unpack Python's signature here.
    let args = args.into_values();
    let (ensure_ascii, indent, separators, sort_keys, kwargs) = from_args::<(
        Option<Value>,
        Option<Value>,
        Option<Value>,
        Option<Value>,
        Kwargs,
    )>(&args)?;
    let pick = |positional: Option<Value>, name: &str| -> Result<Option<Value>, Error> {
        match positional {
            Some(v) => Ok(Some(v)),
            None => kwargs.get::<Option<Value>>(name),
        }
    };
    let ensure_ascii = pick(ensure_ascii, "ensure_ascii")?;
    let indent = pick(indent, "indent")?;
    let separators = pick(separators, "separators")?;
    let sort_keys = pick(sort_keys, "sort_keys")?;
    kwargs.assert_all_used()?;
    let opts = DumpOptions::from_args(
        ensure_ascii.as_ref(),
        indent.as_ref(),
        separators.as_ref(),
        sort_keys.as_ref(),
    )?;
    dumps(value, &opts).map(Value::from)
}

impl DumpOptions {
    /// Interprets the filter's arguments the way `json.dumps` does; `none` means "default".
    pub fn from_args(
        ensure_ascii: Option<&Value>,
        indent: Option<&Value>,
        separators: Option<&Value>,
        sort_keys: Option<&Value>,
    ) -> Result<Self, Error> {
        let given = |v: Option<&Value>| v.filter(|v| !v.is_none() && !v.is_undefined()).cloned();
        let indent = match given(indent) {
            None => None,
            Some(v) if v.kind() == ValueKind::String => Some(v.as_str().unwrap_or("").to_owned()),
            // Python treats bools as ints here (`indent=True` is one space).
            Some(v) if v.kind() == ValueKind::Bool => Some(" ".repeat(usize::from(v.is_true()))),
            Some(v) => match v.as_i64() {
                Some(n) => Some(" ".repeat(usize::try_from(n.clamp(0, 64)).unwrap_or(0))),
                None => return Err(invalid("tojson: indent must be an int or a string")),
            },
        };
        // Python's defaults: ", " between items on one line, "," when lines break.
        let (mut item_sep, mut key_sep) = match indent {
            Some(_) => (",".to_owned(), ": ".to_owned()),
            None => (", ".to_owned(), ": ".to_owned()),
        };
        if let Some(seps) = given(separators) {
            let part = |i: usize| {
                seps.get_item_by_index(i)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
            };
            match (seps.len(), part(0), part(1)) {
                (Some(2), Some(item), Some(key)) => (item_sep, key_sep) = (item, key),
                _ => return Err(invalid("tojson: separators must be a pair of strings")),
            }
        }
        Ok(DumpOptions {
            ensure_ascii: given(ensure_ascii).is_some_and(|v| v.is_true()),
            indent,
            item_sep,
            key_sep,
            sort_keys: given(sort_keys).is_some_and(|v| v.is_true()),
        })
    }
}

impl Default for DumpOptions {
    fn default() -> Self {
        DumpOptions {
            ensure_ascii: false,
            indent: None,
            item_sep: ", ".into(),
            key_sep: ": ".into(),
            sort_keys: false,
        }
    }
}

fn invalid(msg: &'static str) -> Error {
    Error::new(ErrorKind::InvalidOperation, msg)
}

fn not_serializable(kind: ValueKind) -> Error {
    Error::new(
        ErrorKind::InvalidOperation,
        format!("tojson: object of type {kind} is not JSON serializable"),
    )
}

/// Serializes `value` exactly as `json.dumps` would with these options.
pub(super) fn dumps(value: &Value, opts: &DumpOptions) -> Result<String, Error> {
    let mut out = String::new();
    write_value(&mut out, value, opts, 0)?;
    Ok(out)
}

fn write_value(
    out: &mut String,
    value: &Value,
    opts: &DumpOptions,
    depth: usize,
) -> Result<(), Error> {
    if depth > MAX_DEPTH {
        return Err(invalid("tojson: value nested too deeply"));
    }
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => write_number(out, value),
        ValueKind::String => write_str(out, value.as_str().unwrap_or(""), opts.ensure_ascii),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(out, '[', ']', items.len(), opts, depth, |out, i| {
                write_value(out, &items[i], opts, depth + 1)
            })?;
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                entries.push((key_string(&key)?, item));
            }
            if opts.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_container(out, '{', '}', entries.len(), opts, depth, |out, i| {
                let (key, item) = &entries[i];
                write_str(out, key, opts.ensure_ascii);
                out.push_str(&opts.key_sep);
                write_value(out, item, opts, depth + 1)
            })?;
        }
        // Python raises for Jinja's Undefined and any non-JSON object; so do we.
        kind => return Err(not_serializable(kind)),
    }
    Ok(())
}

fn write_container(
    out: &mut String,
    open: char,
    close: char,
    len: usize,
    opts: &DumpOptions,
    depth: usize,
    mut item: impl FnMut(&mut String, usize) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if len == 0 {
        out.push(close);
        return Ok(());
    }
    for i in 0..len {
        if i > 0 {
            out.push_str(&opts.item_sep);
        }
        if let Some(indent) = &opts.indent {
            out.push('\n');
            out.push_str(&indent.repeat(depth + 1));
        }
        item(out, i)?;
    }
    if let Some(indent) = &opts.indent {
        out.push('\n');
        out.push_str(&indent.repeat(depth));
    }
    out.push(close);
    Ok(())
}

/// Dict keys become strings as in Python (`True` → "true", `1.5` → "1.5", `None` → "null").
fn key_string(key: &Value) -> Result<String, Error> {
    match key.kind() {
        ValueKind::String => Ok(key.as_str().unwrap_or("").to_owned()),
        ValueKind::Bool | ValueKind::None | ValueKind::Number => {
            let mut s = String::new();
            write_value(&mut s, key, &DumpOptions::default(), 0)?;
            Ok(s)
        }
        kind => Err(not_serializable(kind)),
    }
}

fn write_number(out: &mut String, value: &Value) {
    if value.is_integer() {
        // Integers print as themselves; `Display` covers i64/u64/i128 alike.
        out.push_str(&value.to_string());
    } else {
        let f = f64::try_from(value.clone()).unwrap_or(f64::NAN);
        out.push_str(&float_repr(f));
    }
}

/// Python's `float.__repr__` (shortest round-trip digits; scientific notation when the decimal
/// exponent is below -4 or at least 16), plus `json.dumps`' spellings of non-finite values.
pub(super) fn float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // `{:e}` gives the shortest round-trip digits, e.g. "-1.25e-7".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let n = digits.len() as i32;
    let point = exp + 1; // digits are 0.d1d2… × 10^point
    let body = if !(-4 < point && point <= 16) {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{first}{frac}e{esign}{:02}", exp.abs())
    } else if point <= 0 {
        format!("0.{}{digits}", "0".repeat(point.unsigned_abs() as usize))
    } else if point < n {
        let (int, frac) = digits.split_at(point as usize);
        format!("{int}.{frac}")
    } else {
        format!("{digits}{}.0", "0".repeat((point - n) as usize))
    };
    format!("{sign}{body}")
}

fn write_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !(' '..='~').contains(&c)) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dump(json: serde_json::Value, opts: DumpOptions) -> String {
        dumps(&Value::from(minijinja::value::Serde(&json)), &opts).unwrap()
    }

    #[test]
    fn matches_python_json_dumps() {
        let v = serde_json::json!({"b": [1, 2.5, true, null], "a": "x<&>'\"\n\u{1}é🙂"});
        // serde_json keeps insertion order (its `preserve_order`, which llguidance needs), as a
        // Python dict does.
        assert_eq!(
            dump(v.clone(), DumpOptions::default()),
            r#"{"b": [1, 2.5, true, null], "a": "x<&>'\"\n\u0001é🙂"}"#
        );
        let ascii = DumpOptions {
            ensure_ascii: true,
            ..DumpOptions::default()
        };
        assert_eq!(
            dump(serde_json::json!(["é🙂\u{7f}"]), ascii),
            r#"["\u00e9\ud83d\ude42\u007f"]"#
        );
        let pretty = DumpOptions::from_args(None, Some(&Value::from(2)), None, None).unwrap();
        assert_eq!(
            dump(serde_json::json!({"a": [1, {}], "b": []}), pretty),
            "{\n  \"a\": [\n    1,\n    {}\n  ],\n  \"b\": []\n}"
        );
    }

    #[test]
    fn floats_use_python_repr() {
        let cases = [
            (1.0, "1.0"),
            (-0.0, "-0.0"),
            (0.1, "0.1"),
            (1e-4, "0.0001"),
            (1e-5, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (123456.789, "123456.789"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.2345e100, "1.2345e+100"),
            (f64::NAN, "NaN"),
            (f64::NEG_INFINITY, "-Infinity"),
        ];
        for (f, want) in cases {
            assert_eq!(float_repr(f), want, "{f}");
        }
    }

    #[test]
    fn undefined_and_bad_args_are_errors() {
        assert!(dumps(&Value::UNDEFINED, &DumpOptions::default()).is_err());
        assert!(DumpOptions::from_args(None, Some(&Value::from(vec![1])), None, None).is_err());
        let seps = Value::from(vec![",", ":"]);
        let opts = DumpOptions::from_args(None, None, Some(&seps), Some(&Value::from(true)));
        assert_eq!(
            dump(serde_json::json!({"b": 1, "a": [1, 2]}), opts.unwrap()),
            r#"{"a":[1,2],"b":1}"#
        );
    }
}
