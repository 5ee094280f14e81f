//! Gemma 4's own tool-call syntax, as its chat template writes calls and the model answers with them
//! (docs/gemma4.md §4): `<|tool_call>call:NAME{key:value,…}<tool_call|>`, one block per call. Values are
//! strings between `<|"|>` quotes (taken verbatim: no escapes), numbers, `true` / `false` / `null`,
//! objects `{key:value,…}` with bare (or quoted) keys, and lists `[value,…]`. [`parse`] turns such an
//! answer into OpenAI calls with JSON arguments; the answer text must hold these tokens as text (the
//! family keeps them: `LoadedFamily::tool_call_tokens`).

use serde_json::value::RawValue;

pub const OPEN: &str = "<|tool_call>";
pub const CLOSE: &str = "<tool_call|>";
const QUOTE: &str = "<|\"|>";

/// The calls of an answer made only of call blocks (whitespace between them), as `(name,
/// arguments JSON)`; `None` when the text is anything else or names a function not in `known`.
pub fn parse(text: &str, known: impl Fn(&str) -> bool) -> Option<Vec<(String, String)>> {
    let (calls, whole) = parse_leading(text, known);
    (whole && !calls.is_empty()).then_some(calls)
}

/// The complete call blocks at the start of `text`, up to the first thing that is not one (an
/// unknown function, a block cut short), and whether that was all of the text.
pub fn parse_leading(text: &str, known: impl Fn(&str) -> bool) -> (Vec<(String, String)>, bool) {
    let mut rest = text.trim();
    let mut calls = Vec::new();
    while !rest.is_empty() {
        match one_call(rest, &known) {
            Some((call, after)) => {
                calls.push(call);
                rest = after;
            }
            None => return (calls, false),
        }
    }
    (calls, true)
}

/// The call block at the start of `s` and the text after it.
fn one_call<'a>(s: &'a str, known: &impl Fn(&str) -> bool) -> Option<((String, String), &'a str)> {
    let rest = s.strip_prefix(OPEN)?.trim_start().strip_prefix("call:")?;
    let brace = rest.find('{')?;
    let name = rest[..brace].trim();
    if name.is_empty() || !known(name) {
        return None;
    }
    let mut p = Values { s: &rest[brace..] };
    let mut args = String::new();
    p.object(&mut args)?;
    let after = p.s.trim_start().strip_prefix(CLOSE)?.trim_start();
    Some(((name.to_string(), args), after))
}

/// A cursor over Gemma-syntax values that writes them out as JSON.
struct Values<'a> {
    s: &'a str,
}

impl Values<'_> {
    fn skip_ws(&mut self) {
        self.s = self.s.trim_start();
    }

    fn eat(&mut self, c: char) -> bool {
        self.skip_ws();
        match self.s.strip_prefix(c) {
            Some(r) => {
                self.s = r;
                true
            }
            None => false,
        }
    }

    fn value(&mut self, out: &mut String) -> Option<()> {
        self.skip_ws();
        if self.s.starts_with(QUOTE) {
            let text = self.quoted()?;
            out.push_str(&serde_json::to_string(text).ok()?);
            return Some(());
        }
        match self.s.chars().next()? {
            '{' => self.object(out),
            '[' => self.list(out),
            _ => {
                // A bare literal runs to the next delimiter.
                let end = self
                    .s
                    .find([',', '}', ']'])
                    .unwrap_or(self.s.len())
                    .min(self.s.find(CLOSE).unwrap_or(self.s.len()));
                let lit = self.s[..end].trim();
                self.s = &self.s[end..];
                if lit.is_empty() {
                    return None;
                }
                // Numbers (of any size, as written), booleans and null stay as they are; anything else
                // the model left unquoted is a string.
                match serde_json::from_str::<&RawValue>(lit) {
                    Ok(v) if !v.get().starts_with(['"', '{', '[']) => out.push_str(lit),
                    _ => out.push_str(&serde_json::to_string(lit).ok()?),
                }
                Some(())
            }
        }
    }

    /// A `<|"|>…<|"|>` string's text.
    fn quoted(&mut self) -> Option<&str> {
        let body = self.s.strip_prefix(QUOTE)?;
        let end = body.find(QUOTE)?;
        self.s = &body[end + QUOTE.len()..];
        Some(&body[..end])
    }

    fn object(&mut self, out: &mut String) -> Option<()> {
        if !self.eat('{') {
            return None;
        }
        out.push('{');
        if self.eat('}') {
            out.push('}');
            return Some(());
        }
        loop {
            self.skip_ws();
            let key = if self.s.starts_with(QUOTE) {
                self.quoted()?.to_string()
            } else {
                let end = self.s.find(':')?;
                let key = self.s[..end].trim().to_string();
                self.s = &self.s[end..];
                key
            };
            if key.is_empty() || !self.eat(':') {
                return None;
            }
            out.push_str(&serde_json::to_string(&key).ok()?);
            out.push(':');
            self.value(out)?;
            if self.eat(',') {
                out.push(',');
            } else if self.eat('}') {
                out.push('}');
                return Some(());
            } else {
                return None;
            }
        }
    }

    fn list(&mut self, out: &mut String) -> Option<()> {
        if !self.eat('[') {
            return None;
        }
        out.push('[');
        if self.eat(']') {
            out.push(']');
            return Some(());
        }
        loop {
            self.value(out)?;
            if self.eat(',') {
                out.push(',');
            } else if self.eat(']') {
                out.push(']');
                return Some(());
            } else {
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn calls(text: &str) -> Option<Vec<(String, serde_json::Value)>> {
        parse(text, |n| n == "get_weather" || n == "add").map(|v| {
            v.into_iter()
                .map(|(n, a)| (n, serde_json::from_str(&a).unwrap()))
                .collect()
        })
    }

    #[test]
    fn the_template_syntax_becomes_json_arguments() {
        let text = r#"<|tool_call>call:get_weather{location:<|"|>Paris, "FR"<|"|>,days:3,units:{metric:true,names:[<|"|>a<|"|>,null]}}<tool_call|>"#;
        assert_eq!(
            calls(text).unwrap(),
            [(
                "get_weather".to_string(),
                json!({"location": "Paris, \"FR\"", "days": 3,
                       "units": {"metric": true, "names": ["a", null]}})
            )]
        );
        // Several calls, whitespace around, quoted keys, an empty object, a huge number kept as written.
        let text = "  <|tool_call>call:add{<|\"|>a<|\"|>: 1.5e3 , b:-2}<tool_call|>\n<|tool_call>call:get_weather{}<tool_call|> ";
        assert_eq!(
            calls(text).unwrap(),
            [
                ("add".to_string(), json!({"a": 1500.0, "b": -2})),
                ("get_weather".to_string(), json!({}))
            ]
        );
        let big = parse(
            "<|tool_call>call:add{a:27E+059244000706410}<tool_call|>",
            |_| true,
        )
        .unwrap();
        assert_eq!(big[0].1, r#"{"a":27E+059244000706410}"#);
        // A bare word the model left unquoted is a string.
        assert_eq!(
            calls("<|tool_call>call:add{a:Paris}<tool_call|>").unwrap()[0].1,
            json!({"a": "Paris"})
        );
    }

    #[test]
    fn anything_else_is_not_a_call() {
        for text in [
            "",
            "The weather is fine.",
            "<|tool_call>call:unknown{}<tool_call|>",
            "<|tool_call>call:add{a:1}",
            "<|tool_call>call:add{a:1}<tool_call|> and some text",
            "<|tool_call>call:add{a 1}<tool_call|>",
            "<|tool_call>call:add{a:<|\"|>open}<tool_call|>",
            "<|tool_call>call:add[1]<tool_call|>",
        ] {
            assert_eq!(calls(text), None, "{text:?}");
        }
    }
}
