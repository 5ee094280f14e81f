//! A first look at a request body, before it is parsed into values: the model it names and how many
//! bytes of prompt text it carries, read by one pass of the JSON parser that allocates nothing for
//! the text (serde visits the strings in the body itself). With the model's bound on bytes per token
//! (heartbeats' `max_token_bytes`), a prompt that cannot fit the context is refused from that count,
//! in milliseconds and without copies, whatever its size — not after the body is parsed, the job
//! published and the text rendered and tokenized.
//!
//! Only text every chat template writes out is counted (message content, trimmed; tool results;
//! instructions and system prompts; a completion's prompt), so the count never exceeds what the
//! prompt really holds and a request that fits is never refused here.

use std::fmt;
use std::sync::Arc;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::registry::Lookup;
use super::AppState;
use crate::error::{ClassifiedError, ErrorClass};
use crate::pipeline::prompt_size::min_tokens;

/// Which API's body it is (they keep their prompt text under different fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Api {
    Chat,
    Completions,
    Responses,
    Messages,
}

impl Api {
    /// Top-level fields holding prompt text.
    fn fields(self) -> &'static [&'static str] {
        match self {
            Api::Chat => &["messages"],
            Api::Completions => &["prompt"],
            Api::Responses => &["input", "instructions"],
            Api::Messages => &["system", "messages"],
        }
    }

    /// The request field a refusal names.
    fn param(self) -> &'static str {
        match self {
            Api::Completions => "prompt",
            Api::Responses => "input",
            Api::Chat | Api::Messages => "messages",
        }
    }
}

/// Fields inside messages, content parts and items that hold text the template writes out.
const NESTED: &[&str] = &["content", "text", "output"];

/// What the first look found.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Peek {
    pub model: Option<String>,
    /// Bytes of prompt text (for the completions API: of its longest prompt).
    pub text_bytes: usize,
}

/// The model and prompt size of `body`; `None` when it is not a JSON object (the full parse then
/// says what is wrong with it).
pub(super) fn peek(api: Api, body: &[u8]) -> Option<Peek> {
    let mut de = serde_json::Deserializer::from_slice(body);
    TopSeed(api).deserialize(&mut de).ok()
}

/// Refuses a body whose prompt text is longer than the model's context can hold, before anything
/// is parsed or published. Anything unclear (no model, unknown model, no bound) is left to the
/// full validation.
pub(super) fn refuse_oversized(
    state: &Arc<AppState>,
    api: Api,
    body: &[u8],
) -> Result<(), ClassifiedError> {
    let Some(Peek {
        model: Some(model),
        text_bytes,
    }) = peek(api, body)
    else {
        return Ok(());
    };
    let Lookup::Served(m) = state.registry.lookup(&model) else {
        return Ok(());
    };
    let (Some(per_token), ctx) = (m.max_token_bytes, m.context_length as usize) else {
        return Ok(());
    };
    let at_least = min_tokens(text_bytes, per_token);
    let max_prompt = ctx.saturating_sub(1);
    if ctx == 0 || at_least <= max_prompt {
        return Ok(());
    }
    Err(ClassifiedError::new(
        ErrorClass::ContextLengthExceeded,
        format!(
            "the prompt has at least {at_least} tokens ({text_bytes} bytes of text, at most {per_token} bytes a token); model {} accepts at most {max_prompt} prompt tokens (context length {ctx})",
            m.name
        ),
    )
    .with_param(api.param()))
}

/// Numbers, booleans and null hold no prompt text.
macro_rules! scalars_count_nothing {
    () => {
        fn visit_bool<E>(self, _: bool) -> Result<usize, E> {
            Ok(0)
        }
        fn visit_i64<E>(self, _: i64) -> Result<usize, E> {
            Ok(0)
        }
        fn visit_u64<E>(self, _: u64) -> Result<usize, E> {
            Ok(0)
        }
        fn visit_f64<E>(self, _: f64) -> Result<usize, E> {
            Ok(0)
        }
        fn visit_unit<E>(self) -> Result<usize, E> {
            Ok(0)
        }
    };
}

struct TopSeed(Api);

impl<'de> DeserializeSeed<'de> for TopSeed {
    type Value = Peek;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Peek, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for TopSeed {
    type Value = Peek;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Peek, A::Error> {
        let mut out = Peek::default();
        while let Some(key) = map.next_key::<KeyName>()? {
            let key = key.0;
            if key == "model" {
                let v = map.next_value::<serde_json::Value>()?;
                out.model = v.as_str().map(str::to_string);
            } else if self.0 == Api::Completions && key == "prompt" {
                out.text_bytes += map.next_value_seed(Longest)?;
            } else if self.0.fields().contains(&key.as_str()) {
                out.text_bytes += map.next_value_seed(Text)?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(out)
    }
}

/// A key (field names are short; any string allocates a little).
struct KeyName(String);

impl<'de> serde::Deserialize<'de> for KeyName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(KeyName)
    }
}

/// Bytes of template-written text in a value: a string's trimmed length; the sum over an array's
/// elements; an object's [`NESTED`] fields; nothing for numbers, booleans and null.
struct Text;

impl<'de> DeserializeSeed<'de> for Text {
    type Value = usize;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<usize, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Text {
    type Value = usize;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<usize, E> {
        Ok(v.trim().len())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
        let mut n = 0;
        while let Some(b) = seq.next_element_seed(Text)? {
            n += b;
        }
        Ok(n)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<usize, A::Error> {
        let mut n = 0;
        while let Some(key) = map.next_key::<KeyName>()? {
            if NESTED.contains(&key.0.as_str()) {
                n += map.next_value_seed(Text)?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(n)
    }
    scalars_count_nothing!();
}

/// A completion's `prompt`: a string's length, or the longest string of an array (each is a job
/// of its own); token arrays count nothing here (workers check ids cheaply).
struct Longest;

impl<'de> DeserializeSeed<'de> for Longest {
    type Value = usize;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<usize, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Longest {
    type Value = usize;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a prompt")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<usize, E> {
        Ok(v.len())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
        let mut n = 0;
        while let Some(b) = seq.next_element_seed(Longest)? {
            n = n.max(b);
        }
        Ok(n)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<usize, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(0)
    }
    scalars_count_nothing!();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(api: Api, body: &str) -> Peek {
        peek(api, body.as_bytes()).expect("an object")
    }

    #[test]
    fn counts_only_the_text_templates_write() {
        let chat = r#"{"model":"m","messages":[
            {"role":"system","content":"  sys  "},
            {"role":"user","content":[{"type":"text","text":"héllo"},
                {"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]},
            {"role":"assistant","content":null,"tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{\"x\":1}"}}]},
            {"role":"tool","tool_call_id":"c","content":"4\n2"}],
            "tools":[{"type":"function","function":{"name":"f","description":"long description"}}]}"#;
        assert_eq!(
            p(Api::Chat, chat),
            Peek {
                model: Some("m".into()),
                text_bytes: 3 + 6 + 3
            }
        );
        let completions = r#"{"prompt":["ab","abcd",[1,2,3]],"model":"m","max_tokens":3}"#;
        assert_eq!(p(Api::Completions, completions).text_bytes, 4);
        let responses = r#"{"model":"m","instructions":"be brief","input":[
            {"type":"message","role":"user","content":[{"type":"input_text","text":"hi"},{"type":"input_image","image_url":"data:x"}]},
            {"type":"function_call","call_id":"c","name":"f","arguments":"{\"long\":\"arguments\"}"},
            {"type":"function_call_output","call_id":"c","output":"out"}],
            "text":{"format":{"type":"text"}}}"#;
        assert_eq!(p(Api::Responses, responses).text_bytes, 8 + 2 + 3);
        let messages = r#"{"model":"m","system":[{"type":"text","text":"sys"}],"messages":[
            {"role":"user","content":[{"type":"tool_result","tool_use_id":"t","content":[{"type":"text","text":"res"}]},
              {"type":"image","source":{"type":"base64","media_type":"image/png","data":"AAAA"}}]},
            {"role":"assistant","content":[{"type":"thinking","thinking":"hmm"},{"type":"tool_use","id":"t","name":"f","input":{"content":"x"}}]}],
            "max_tokens":5}"#;
        assert_eq!(p(Api::Messages, messages).text_bytes, 3 + 3);
    }

    #[test]
    fn anything_else_is_left_to_the_full_parse() {
        assert!(peek(Api::Chat, b"[1,2]").is_none());
        assert!(peek(Api::Chat, b"{\"model\":").is_none());
        assert_eq!(p(Api::Chat, r#"{"model":7}"#).model, None);
    }
}
