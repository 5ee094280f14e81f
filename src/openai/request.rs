//! Validation of `POST /v1/chat/completions` bodies into a [`ValidChatRequest`].
//!
//! The body is parsed as JSON first and then checked field by field, so every rejection names the
//! field (`param`) and says what was expected — serde's own messages ("invalid type at line 1 column
//! 40") would not. Unknown fields are ignored, as OpenAI's API does.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::error::{ClassifiedError, ErrorClass};
use crate::pipeline::grammar::Grammar;
use crate::pipeline::template::RESERVED_VARIABLES;
use crate::protocol::{
    ChatMessage, ContentPart, MediaSource, ResponseFormat, Role, SamplingOverrides, ToolCall,
    ToolChoice, ToolSpec, MAX_TOP_LOGPROBS,
};

/// Request-shape limits the front end enforces before anything is queued.
#[derive(Debug, Clone)]
pub struct RequestLimits {
    pub max_messages: usize,
    pub max_images: usize,
    pub max_audio_clips: usize,
    /// Largest `max_tokens` accepted at all (the worker also checks the model's context).
    pub max_tokens: u32,
    /// Accept `http(s)://` image URLs (the front end fetches them).
    pub allow_remote_media: bool,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_messages: 1024,
            max_images: 8,
            max_audio_clips: 4,
            max_tokens: 1 << 20,
            allow_remote_media: false,
        }
    }
}

/// A request that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub sampling: SamplingOverrides,
    pub max_tokens: Option<u32>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// Extension (as vLLM): return the generated token ids.
    pub return_token_ids: bool,
    /// Extension (as vLLM): do not stop at end-of-sequence ids.
    pub ignore_eos: bool,
    /// Choices to generate (1 ..= 8).
    pub n: u32,
    /// vLLM's `cache_salt`: requests reuse cached KV only from requests with the same salt (and the
    /// same API key).
    pub cache_salt: Option<String>,
    pub response_format: Option<ResponseFormat>,
    pub tools: Vec<ToolSpec>,
    pub tool_choice: Option<ToolChoice>,
    pub parallel_tool_calls: Option<bool>,
    /// `logprobs: true` with this many `top_logprobs`.
    pub logprobs: Option<u32>,
    pub logit_bias: BTreeMap<u32, f32>,
    /// Extension (as vLLM): extra chat-template variables, e.g. `{"enable_thinking": true}`; `None`
    /// when absent or empty.
    pub chat_template_kwargs: Option<Map<String, Value>>,
}

fn is_remote(url: &str) -> bool {
    url.starts_with("http://") || url.starts_with("https://")
}

/// An image given by URL, to be fetched by the front end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteMedia {
    pub message: usize,
    pub part: usize,
    pub url: String,
}

impl ValidChatRequest {
    /// Images given as `http(s)://` URLs (accepted only with `allow_remote_media`).
    pub fn remote_media(&self) -> Vec<RemoteMedia> {
        let mut out = Vec::new();
        for (i, m) in self.messages.iter().enumerate() {
            for (j, p) in m.content.iter().enumerate() {
                if let ContentPart::Image {
                    source: MediaSource::Inline { data },
                } = p
                {
                    if is_remote(data) {
                        out.push(RemoteMedia {
                            message: i,
                            part: j,
                            url: data.clone(),
                        });
                    }
                }
            }
        }
        out
    }

    /// Replaces a remote image with the fetched bytes.
    pub fn set_media(&mut self, at: &RemoteMedia, bytes: &[u8]) {
        use base64::Engine as _;
        if let Some(ContentPart::Image { source }) = self
            .messages
            .get_mut(at.message)
            .and_then(|m| m.content.get_mut(at.part))
        {
            *source = MediaSource::Inline {
                data: base64::engine::general_purpose::STANDARD.encode(bytes),
            };
        }
    }
}

pub(crate) fn invalid(param: &str, msg: impl Into<String>) -> ClassifiedError {
    ClassifiedError::invalid(param, msg)
}

pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A field that is absent or `null` is `None`.
pub(crate) fn field<'a>(o: &'a Map<String, Value>, k: &str) -> Option<&'a Value> {
    o.get(k).filter(|v| !v.is_null())
}

pub(crate) fn number(
    o: &Map<String, Value>,
    k: &str,
    lo: f64,
    hi: f64,
    lo_open: bool,
) -> Result<Option<f32>, ClassifiedError> {
    let Some(v) = field(o, k) else {
        return Ok(None);
    };
    let x = v
        .as_f64()
        .ok_or_else(|| invalid(k, format!("{k} must be a number, got {}", type_name(v))))?;
    let below = if lo_open { x <= lo } else { x < lo };
    if !x.is_finite() || below || x > hi {
        let range = if lo_open {
            format!("({lo}, {hi}]")
        } else {
            format!("[{lo}, {hi}]")
        };
        return Err(invalid(k, format!("{k} must be in {range}, got {x}")));
    }
    Ok(Some(x as f32))
}

pub(crate) fn integer(o: &Map<String, Value>, k: &str) -> Result<Option<i64>, ClassifiedError> {
    let Some(v) = field(o, k) else {
        return Ok(None);
    };
    if let Some(i) = v.as_i64() {
        return Ok(Some(i));
    }
    if let Some(u) = v.as_u64() {
        return Ok(Some(u as i64));
    }
    match v.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(Some(f as i64)),
        _ => Err(invalid(
            k,
            format!("{k} must be an integer, got {}", type_name(v)),
        )),
    }
}

pub(crate) fn boolean(o: &Map<String, Value>, k: &str) -> Result<bool, ClassifiedError> {
    match field(o, k) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(invalid(
            k,
            format!("{k} must be a boolean, got {}", type_name(v)),
        )),
    }
}

/// The body as an object, and its `model`.
pub(crate) fn object_and_model(
    body: &Value,
) -> Result<(&Map<String, Value>, String), ClassifiedError> {
    let o = body.as_object().ok_or_else(|| {
        invalid(
            "body",
            format!(
                "the request body must be a JSON object, got {}",
                type_name(body)
            ),
        )
    })?;
    let model = match o.get("model") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(Value::String(_)) => return Err(invalid("model", "model must not be empty")),
        Some(v) => {
            return Err(invalid(
                "model",
                format!("model must be a string, got {}", type_name(v)),
            ))
        }
        None => return Err(invalid("model", "model is required")),
    };
    Ok((o, model))
}

/// `n`: choices per prompt, 1 ..= [`crate::protocol::MAX_CHOICES`].
pub(crate) fn n_field(o: &Map<String, Value>) -> Result<u32, ClassifiedError> {
    let max_n = crate::protocol::MAX_CHOICES as i64;
    match integer(o, "n")? {
        None => Ok(1),
        Some(n) if (1..=max_n).contains(&n) => Ok(n as u32),
        Some(n) => Err(invalid(
            "n",
            format!("n must be between 1 and {max_n}, got {n}"),
        )),
    }
}

/// Validates a parsed body.
pub fn validate(body: &Value, limits: &RequestLimits) -> Result<ValidChatRequest, ClassifiedError> {
    let (o, model) = object_and_model(body)?;
    let mut messages = parse_messages(o, limits)?;
    attach_images(o, &mut messages, limits.allow_remote_media)?;
    count_media(&messages, limits)?;

    let n = n_field(o)?;
    let cache_salt = match field(o, "cache_salt") {
        None => None,
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::String(_)) => {
            return Err(invalid("cache_salt", "cache_salt must not be empty"))
        }
        Some(v) => {
            return Err(invalid(
                "cache_salt",
                format!("cache_salt must be a string, got {}", type_name(v)),
            ))
        }
    };
    refuse_unsupported(o)?;
    let logprobs = logprobs_field(o)?;
    let response_format = response_format(o)?;
    let (tools, tool_choice) = tools_fields(o)?;
    let parallel_tool_calls = match field(o, "parallel_tool_calls") {
        None => None,
        Some(_) => Some(boolean(o, "parallel_tool_calls")?),
    };
    let logit_bias = logit_bias(o)?;
    let chat_template_kwargs = chat_template_kwargs(o)?;

    let common = common_fields(o, limits)?;
    let Common {
        sampling,
        max_tokens,
        stop,
        stream,
        include_usage,
    } = common;
    Ok(ValidChatRequest {
        model,
        messages,
        sampling,
        max_tokens,
        stop,
        stream,
        include_usage,
        return_token_ids: boolean(o, "return_token_ids")?,
        ignore_eos: boolean(o, "ignore_eos")?,
        n,
        cache_salt,
        response_format,
        tools,
        tool_choice,
        parallel_tool_calls,
        logprobs,
        logit_bias,
        chat_template_kwargs,
    })
}

/// `chat_template_kwargs`: an object of extra template variables, none of them one the renderer sets
/// itself (transformers would fail on a duplicate argument; here it would be silently ignored).
fn chat_template_kwargs(
    o: &Map<String, Value>,
) -> Result<Option<Map<String, Value>>, ClassifiedError> {
    const P: &str = "chat_template_kwargs";
    let kwargs = match field(o, P) {
        None => return Ok(None),
        Some(Value::Object(m)) => m,
        Some(v) => {
            return Err(invalid(
                P,
                format!("{P} must be an object, got {}", type_name(v)),
            ))
        }
    };
    if let Some(name) = kwargs
        .keys()
        .find(|k| RESERVED_VARIABLES.contains(&k.as_str()))
    {
        return Err(invalid(
            &format!("{P}.{name}"),
            format!(
                "{P} cannot set {name}: the server sets it (reserved: {})",
                RESERVED_VARIABLES.join(", ")
            ),
        ));
    }
    Ok((!kwargs.is_empty()).then(|| kwargs.clone()))
}

/// Fields `/v1/chat/completions` and `/v1/completions` share.
pub(crate) struct Common {
    pub sampling: SamplingOverrides,
    pub max_tokens: Option<u32>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

/// Sampling, `max_tokens` / `max_completion_tokens`, `stop`, `stream`, `stream_options`.
pub(crate) fn common_fields(
    o: &Map<String, Value>,
    limits: &RequestLimits,
) -> Result<Common, ClassifiedError> {
    let top_k = match integer(o, "top_k")? {
        None => None,
        Some(k) if k == -1 || k == 0 => Some(0),
        Some(k) if k > 0 => Some(k.min(u32::MAX as i64) as u32),
        Some(k) => {
            return Err(invalid(
                "top_k",
                format!("top_k must be a positive integer (or -1 or 0 for none), got {k}"),
            ))
        }
    };
    let sampling = SamplingOverrides {
        temperature: number(o, "temperature", 0.0, 2.0, false)?,
        top_p: number(o, "top_p", 0.0, 1.0, true)?,
        top_k,
        min_p: number(o, "min_p", 0.0, 1.0, false)?,
        presence_penalty: number(o, "presence_penalty", -2.0, 2.0, false)?,
        frequency_penalty: number(o, "frequency_penalty", -2.0, 2.0, false)?,
        repetition_penalty: number(o, "repetition_penalty", 0.0, 10.0, true)?,
        seed: integer(o, "seed")?.map(|s| s as u64),
    };
    let max_tokens = match (
        integer(o, "max_completion_tokens")?,
        integer(o, "max_tokens")?,
    ) {
        (Some(m), _) => Some(("max_completion_tokens", m)),
        (None, Some(m)) => Some(("max_tokens", m)),
        (None, None) => None,
    };
    let max_tokens = match max_tokens {
        None => None,
        Some((k, m)) if m < 1 => {
            return Err(invalid(k, format!("{k} must be at least 1, got {m}")))
        }
        Some((k, m)) if m > limits.max_tokens as i64 => {
            return Err(invalid(
                k,
                format!("{k} must be at most {}, got {m}", limits.max_tokens),
            ))
        }
        Some((_, m)) => Some(m as u32),
    };
    let stop = match field(o, "stop") {
        None => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => {
            if a.len() > 4 {
                return Err(invalid(
                    "stop",
                    format!("stop takes at most 4 strings, got {}", a.len()),
                ));
            }
            a.iter()
                .map(|s| {
                    s.as_str().map(str::to_string).ok_or_else(|| {
                        invalid(
                            "stop",
                            format!("stop must hold strings, got {}", type_name(s)),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?
        }
        Some(v) => {
            return Err(invalid(
                "stop",
                format!(
                    "stop must be a string or an array of strings, got {}",
                    type_name(v)
                ),
            ))
        }
    };
    let stop = stop.into_iter().filter(|s| !s.is_empty()).collect();
    let stream = boolean(o, "stream")?;
    let include_usage = match field(o, "stream_options") {
        None => false,
        Some(Value::Object(so)) => boolean(so, "include_usage")
            .map_err(|e| e.with_param("stream_options.include_usage"))?,
        Some(v) => {
            return Err(invalid(
                "stream_options",
                format!("stream_options must be an object, got {}", type_name(v)),
            ))
        }
    };
    Ok(Common {
        sampling,
        max_tokens,
        stop,
        stream,
        include_usage,
    })
}

/// OpenAI request fields this server accepts and ignores, with why (the README lists them).
pub const IGNORED_FIELDS: &[(&str, &str)] = &[
    ("metadata", "stored-completion tags; nothing is stored"),
    ("store", "nothing is stored"),
    ("user", "an end-user id for OpenAI's abuse monitoring"),
    (
        "safety_identifier",
        "an end-user id for OpenAI's abuse monitoring",
    ),
    ("service_tier", "one tier here"),
    (
        "prompt_cache_key",
        "the prefix cache needs no hint (cache_salt isolates)",
    ),
    (
        "reasoning_effort",
        "no effort levels; thinking models switch with chat_template_kwargs",
    ),
    ("verbosity", "no length presets; use max_tokens"),
    (
        "prediction",
        "predicted outputs only speed up; every token is generated",
    ),
    (
        "modalities",
        "[\"text\"] is what is produced (\"audio\" is refused)",
    ),
    (
        "stream_options.include_obfuscation",
        "no obfuscation padding is sent",
    ),
];

/// Fields OpenAI documents that this server cannot honour: a 400 naming them.
pub(crate) fn refuse_unsupported(o: &Map<String, Value>) -> Result<(), ClassifiedError> {
    if field(o, "audio").is_some() {
        return Err(invalid(
            "audio",
            "audio output is not supported by this server",
        ));
    }
    if let Some(Value::Array(m)) = field(o, "modalities") {
        if m.iter().any(|x| x.as_str() == Some("audio")) {
            return Err(invalid(
                "modalities",
                "audio output is not supported by this server; use [\"text\"]",
            ));
        }
    }
    if field(o, "web_search_options").is_some() {
        return Err(invalid(
            "web_search_options",
            "web search is not supported by this server",
        ));
    }
    Ok(())
}

pub(crate) fn logprobs_field(o: &Map<String, Value>) -> Result<Option<u32>, ClassifiedError> {
    let on = boolean(o, "logprobs")?;
    let top = integer(o, "top_logprobs")?;
    match (on, top) {
        (false, None) => Ok(None),
        (false, Some(_)) => Err(invalid(
            "top_logprobs",
            "top_logprobs needs logprobs set to true",
        )),
        (true, None) => Ok(Some(0)),
        (true, Some(k)) if (0..=MAX_TOP_LOGPROBS as i64).contains(&k) => Ok(Some(k as u32)),
        (true, Some(k)) => Err(invalid(
            "top_logprobs",
            format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"),
        )),
    }
}

/// Checks that a grammar compiles; the error names `param`.
pub(crate) fn check_grammar(param: &str, g: Grammar) -> Result<(), ClassifiedError> {
    g.check().map_err(|e| {
        invalid(
            param,
            format!("{param} cannot be used for constrained decoding: {e}"),
        )
    })
}

fn response_format(o: &Map<String, Value>) -> Result<Option<ResponseFormat>, ClassifiedError> {
    let Some(rf) = field(o, "response_format") else {
        return Ok(None);
    };
    let rf = rf.as_object().ok_or_else(|| {
        invalid(
            "response_format",
            format!("response_format must be an object, got {}", type_name(rf)),
        )
    })?;
    let t = rf
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("response_format.type", "response_format.type is required"))?;
    let string_of = |k: &str| -> Result<String, ClassifiedError> {
        let p = format!("response_format.{k}");
        rf.get(k)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| invalid(&p, format!("{p} must be a string")))
    };
    let f = match t {
        "text" => return Ok(None),
        "json_object" => ResponseFormat::JsonObject,
        "json_schema" => {
            let js = rf
                .get("json_schema")
                .and_then(Value::as_object)
                .ok_or_else(|| {
                    invalid(
                        "response_format.json_schema",
                        "response_format.json_schema must be an object with a schema",
                    )
                })?;
            let name = match js.get("name") {
                None | Some(Value::Null) => None,
                Some(Value::String(n)) => Some(n.clone()),
                Some(_) => {
                    return Err(invalid(
                        "response_format.json_schema.name",
                        "response_format.json_schema.name must be a string",
                    ))
                }
            };
            if let Some(v) = js.get("strict").filter(|v| !v.is_null() && !v.is_boolean()) {
                return Err(invalid(
                    "response_format.json_schema.strict",
                    format!(
                        "response_format.json_schema.strict must be a boolean, got {}",
                        type_name(v)
                    ),
                ));
            }
            let schema = match js.get("schema") {
                None | Some(Value::Null) => serde_json::json!({}),
                Some(s @ Value::Object(_)) | Some(s @ Value::Bool(_)) => s.clone(),
                Some(v) => {
                    return Err(invalid(
                        "response_format.json_schema.schema",
                        format!(
                            "response_format.json_schema.schema must be a JSON Schema object, got {}",
                            type_name(v)
                        ),
                    ))
                }
            };
            check_grammar(
                "response_format.json_schema.schema",
                Grammar::JsonSchema(schema.clone()),
            )?;
            ResponseFormat::JsonSchema { schema, name }
        }
        "grammar" => {
            let grammar = string_of("grammar")?;
            check_grammar("response_format.grammar", Grammar::Lark(grammar.clone()))?;
            ResponseFormat::Grammar { grammar }
        }
        "regex" => {
            let pattern = string_of("pattern")?;
            check_grammar("response_format.pattern", Grammar::regex(&pattern))?;
            ResponseFormat::Regex { pattern }
        }
        other => {
            return Err(invalid(
                "response_format.type",
                format!("response_format.type {other:?} is not supported; use text, json_object or json_schema (or the extensions grammar and regex)"),
            ))
        }
    };
    Ok(Some(f))
}

fn valid_function_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// A function tool of any API, checked: its name (at `{p}.name`) and its schema (at
/// `{p}.{schema_field}`: an object — or, when `required` is false, absent for "no parameters" — that
/// compiles for constrained decoding).
pub(crate) fn checked_tool(
    p: &str,
    name: &str,
    description: Option<String>,
    schema: Option<&Value>,
    schema_field: &str,
    required: bool,
) -> Result<ToolSpec, ClassifiedError> {
    if !valid_function_name(name) {
        return Err(invalid(
            &format!("{p}.name"),
            format!("{p}.name {name:?} must be 1-64 letters, digits, '_', '-' or '.'"),
        ));
    }
    let sp = format!("{p}.{schema_field}");
    let parameters = match schema {
        Some(v @ Value::Object(_)) => v.clone(),
        None | Some(Value::Null) if !required => {
            serde_json::json!({"type": "object", "properties": {}})
        }
        None | Some(Value::Null) => return Err(invalid(&sp, format!("{sp} is required"))),
        Some(v) => {
            return Err(invalid(
                &sp,
                format!("{sp} must be a JSON Schema object, got {}", type_name(v)),
            ))
        }
    };
    check_grammar(&sp, Grammar::JsonSchema(parameters.clone()))?;
    Ok(ToolSpec {
        name: name.to_string(),
        description,
        parameters,
    })
}

/// One `{"name", "description", "parameters"}` function object.
fn function_spec(p: &str, f: &Value) -> Result<ToolSpec, ClassifiedError> {
    let f = f
        .as_object()
        .ok_or_else(|| invalid(p, format!("{p} must be an object")))?;
    let Some(Value::String(name)) = f.get("name") else {
        return Err(invalid(
            &format!("{p}.name"),
            format!("{p}.name is required"),
        ));
    };
    let description = match f.get("description") {
        None | Some(Value::Null) => None,
        Some(Value::String(d)) => Some(d.clone()),
        Some(_) => {
            return Err(invalid(
                &format!("{p}.description"),
                format!("{p}.description must be a string"),
            ))
        }
    };
    checked_tool(
        p,
        name,
        description,
        f.get("parameters"),
        "parameters",
        false,
    )
}

/// `tools` and `tool_choice` (and the deprecated `functions` and `function_call`, mapped to them).
fn tools_fields(
    o: &Map<String, Value>,
) -> Result<(Vec<ToolSpec>, Option<ToolChoice>), ClassifiedError> {
    let mut tools = Vec::new();
    let (list_key, choice_key) = if field(o, "tools").is_some() || field(o, "functions").is_none() {
        ("tools", "tool_choice")
    } else {
        ("functions", "function_call")
    };
    if let Some(v) = field(o, list_key) {
        let arr = v.as_array().ok_or_else(|| {
            invalid(
                list_key,
                format!("{list_key} must be an array, got {}", type_name(v)),
            )
        })?;
        for (i, t) in arr.iter().enumerate() {
            let p = format!("{list_key}[{i}]");
            let spec = if list_key == "functions" {
                function_spec(&p, t)?
            } else {
                let to = t
                    .as_object()
                    .ok_or_else(|| invalid(&p, format!("{p} must be an object")))?;
                match to.get("type").and_then(Value::as_str) {
                    Some("function") => {}
                    Some(other) => {
                        return Err(invalid(
                            &format!("{p}.type"),
                            format!("{p}.type {other:?} is not supported; use \"function\""),
                        ))
                    }
                    None => {
                        return Err(invalid(
                            &format!("{p}.type"),
                            format!("{p}.type is required"),
                        ))
                    }
                }
                function_spec(
                    &format!("{p}.function"),
                    to.get("function").unwrap_or(&Value::Null),
                )?
            };
            if tools.iter().any(|x: &ToolSpec| x.name == spec.name) {
                return Err(invalid(
                    &p,
                    format!("{p}: two functions are named {:?}", spec.name),
                ));
            }
            tools.push(spec);
        }
    }
    let choice = match field(o, choice_key) {
        None => None,
        Some(Value::String(s)) => Some(match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" if choice_key == "tool_choice" => ToolChoice::Required,
            other => {
                return Err(invalid(
                    choice_key,
                    format!("{choice_key} {other:?} is not one of none, auto, required, or a function object"),
                ))
            }
        }),
        Some(Value::Object(c)) => {
            let name = c
                .get("function")
                .and_then(|f| f.get("name"))
                .or_else(|| c.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    invalid(
                        choice_key,
                        format!("{choice_key} must name a function: {{\"type\": \"function\", \"function\": {{\"name\": …}}}}"),
                    )
                })?;
            if !tools.iter().any(|t| t.name == name) {
                return Err(invalid(
                    choice_key,
                    format!("{choice_key} names the function {name:?}, which is not in {list_key}"),
                ));
            }
            Some(ToolChoice::Function {
                name: name.to_string(),
            })
        }
        Some(v) => {
            return Err(invalid(
                choice_key,
                format!("{choice_key} must be a string or an object, got {}", type_name(v)),
            ))
        }
    };
    if tools.is_empty()
        && matches!(
            choice,
            Some(ToolChoice::Required | ToolChoice::Function { .. })
        )
    {
        return Err(invalid(
            choice_key,
            format!("{choice_key} asks for a call but no {list_key} are given"),
        ));
    }
    Ok((tools, choice))
}

pub(crate) fn logit_bias(o: &Map<String, Value>) -> Result<BTreeMap<u32, f32>, ClassifiedError> {
    let Some(v) = field(o, "logit_bias") else {
        return Ok(BTreeMap::new());
    };
    let m = v.as_object().ok_or_else(|| {
        invalid(
            "logit_bias",
            format!(
                "logit_bias must be an object of token ids to numbers, got {}",
                type_name(v)
            ),
        )
    })?;
    let mut out = BTreeMap::new();
    for (k, b) in m {
        let id: u32 = k.parse().map_err(|_| {
            invalid(
                "logit_bias",
                format!("logit_bias keys must be token ids, got {k:?}"),
            )
        })?;
        let b = b
            .as_f64()
            .filter(|b| (-100.0..=100.0).contains(b))
            .ok_or_else(|| {
                invalid(
                    "logit_bias",
                    format!("logit_bias[{k:?}] must be a number in [-100, 100]"),
                )
            })?;
        out.insert(id, b as f32);
    }
    Ok(out)
}

fn parse_messages(
    o: &Map<String, Value>,
    limits: &RequestLimits,
) -> Result<Vec<ChatMessage>, ClassifiedError> {
    let msgs = match o.get("messages") {
        Some(Value::Array(a)) => a,
        Some(v) => {
            return Err(invalid(
                "messages",
                format!("messages must be an array, got {}", type_name(v)),
            ))
        }
        None => return Err(invalid("messages", "messages is required")),
    };
    if msgs.is_empty() {
        return Err(invalid(
            "messages",
            "messages must contain at least one message",
        ));
    }
    if msgs.len() > limits.max_messages {
        return Err(ClassifiedError::new(
            ErrorClass::PayloadTooLarge,
            format!(
                "at most {} messages are accepted, got {}",
                limits.max_messages,
                msgs.len()
            ),
        )
        .with_param("messages"));
    }
    msgs.iter()
        .enumerate()
        .map(|(i, m)| parse_message(i, m, limits.allow_remote_media))
        .collect()
}

fn parse_message(i: usize, m: &Value, remote: bool) -> Result<ChatMessage, ClassifiedError> {
    let p = format!("messages[{i}]");
    let m = m
        .as_object()
        .ok_or_else(|| invalid(&p, format!("{p} must be an object, got {}", type_name(m))))?;
    let role = match m.get("role").and_then(Value::as_str) {
        Some("system") | Some("developer") => Role::System,
        Some("user") => Role::User,
        Some("assistant") => Role::Assistant,
        Some("tool") => Role::Tool,
        Some(other) => {
            return Err(invalid(
                &format!("{p}.role"),
                format!("{p}.role {other:?} is not supported; use system, developer, user, assistant or tool"),
            ))
        }
        None => {
            return Err(invalid(
                &format!("{p}.role"),
                format!("{p}.role is required"),
            ))
        }
    };
    let pc = format!("{p}.content");
    let content = match m.get("content") {
        Some(Value::String(s)) => vec![ContentPart::Text { text: s.clone() }],
        Some(Value::Array(parts)) => parts
            .iter()
            .enumerate()
            .map(|(j, part)| parse_part(&format!("{pc}[{j}]"), role, part, remote))
            .collect::<Result<Vec<_>, _>>()?,
        Some(Value::Null) | None if role == Role::Assistant => vec![],
        Some(v) => {
            return Err(invalid(
                &pc,
                format!(
                    "{pc} must be a string or an array of content parts, got {}",
                    type_name(v)
                ),
            ))
        }
        None => return Err(invalid(&pc, format!("{pc} is required"))),
    };
    let tool_calls = if role == Role::Assistant {
        history_calls(&p, m)?
    } else {
        Vec::new()
    };
    if role == Role::Assistant && content.is_empty() && tool_calls.is_empty() {
        return Err(invalid(&pc, format!("{pc} is required (or tool_calls)")));
    }
    let tool_call_id = match (role, m.get("tool_call_id")) {
        (Role::Tool, Some(Value::String(id))) => Some(id.clone()),
        (Role::Tool, _) => {
            return Err(invalid(
                &format!("{p}.tool_call_id"),
                format!("{p}.tool_call_id is required in a tool message"),
            ))
        }
        _ => None,
    };
    Ok(ChatMessage {
        role,
        content,
        tool_calls,
        tool_call_id,
    })
}

/// An assistant message's `tool_calls` (history).
fn history_calls(p: &str, m: &Map<String, Value>) -> Result<Vec<ToolCall>, ClassifiedError> {
    let Some(v) = m.get("tool_calls").filter(|v| !v.is_null()) else {
        return Ok(Vec::new());
    };
    let pt = format!("{p}.tool_calls");
    let arr = v
        .as_array()
        .ok_or_else(|| invalid(&pt, format!("{pt} must be an array")))?;
    arr.iter()
        .enumerate()
        .map(|(i, c)| {
            let pc = format!("{pt}[{i}]");
            let f = c
                .get("function")
                .and_then(Value::as_object)
                .ok_or_else(|| {
                    invalid(
                        &format!("{pc}.function"),
                        format!("{pc}.function must be an object"),
                    )
                })?;
            let name = f.get("name").and_then(Value::as_str).ok_or_else(|| {
                invalid(
                    &format!("{pc}.function.name"),
                    format!("{pc}.function.name must be a string"),
                )
            })?;
            let arguments = match f.get("arguments") {
                Some(Value::String(a)) => a.clone(),
                Some(v @ Value::Object(_)) => v.to_string(),
                None | Some(Value::Null) => "{}".into(),
                Some(_) => {
                    return Err(invalid(
                        &format!("{pc}.function.arguments"),
                        format!("{pc}.function.arguments must be a JSON string"),
                    ))
                }
            };
            Ok(ToolCall {
                id: c
                    .get("id")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                name: name.to_string(),
                arguments,
            })
        })
        .collect()
}

fn parse_part(
    p: &str,
    role: Role,
    part: &Value,
    remote: bool,
) -> Result<ContentPart, ClassifiedError> {
    let o = part
        .as_object()
        .ok_or_else(|| invalid(p, format!("{p} must be an object, got {}", type_name(part))))?;
    let media_ok = role == Role::User;
    match o.get("type").and_then(Value::as_str) {
        Some("text") => match o.get("text") {
            Some(Value::String(t)) => Ok(ContentPart::Text { text: t.clone() }),
            _ => Err(invalid(
                &format!("{p}.text"),
                format!("{p}.text must be a string"),
            )),
        },
        Some("image_url") if media_ok => {
            let url = match o.get("image_url") {
                Some(Value::Object(iu)) => iu.get("url").and_then(Value::as_str),
                Some(Value::String(s)) => Some(s.as_str()),
                _ => None,
            }
            .ok_or_else(|| {
                invalid(
                    &format!("{p}.image_url.url"),
                    format!("{p}.image_url.url must be a string"),
                )
            })?;
            Ok(ContentPart::Image {
                source: image_source(&format!("{p}.image_url.url"), url, remote)?,
            })
        }
        Some("input_audio") if media_ok => {
            let ia = o
                .get("input_audio")
                .and_then(Value::as_object)
                .ok_or_else(|| {
                    invalid(
                        &format!("{p}.input_audio"),
                        format!("{p}.input_audio must be an object"),
                    )
                })?;
            let data = ia.get("data").and_then(Value::as_str).ok_or_else(|| {
                invalid(
                    &format!("{p}.input_audio.data"),
                    format!("{p}.input_audio.data must be a base64 string"),
                )
            })?;
            let format = match ia.get("format") {
                None | Some(Value::Null) => None,
                Some(Value::String(f)) => Some(f.to_ascii_lowercase()),
                Some(_) => {
                    return Err(invalid(
                        &format!("{p}.input_audio.format"),
                        format!("{p}.input_audio.format must be a string"),
                    ))
                }
            };
            Ok(ContentPart::Audio {
                source: MediaSource::Inline {
                    data: data.to_string(),
                },
                format,
            })
        }
        Some("image_url") | Some("input_audio") => Err(invalid(
            p,
            format!("{p}: images and audio are accepted in user messages only"),
        )),
        Some(other) => Err(invalid(
            &format!("{p}.type"),
            format!("{p}.type {other:?} is not supported; use text, image_url or input_audio"),
        )),
        None => Err(invalid(
            &format!("{p}.type"),
            format!("{p}.type is required"),
        )),
    }
}

/// `data:image/...;base64,XXXX`, or bare base64. `http(s)://` URLs only with `remote` (the front end
/// then fetches them, see [`ValidChatRequest::remote_media`]); they are kept as the inline data for
/// now, which cannot be confused with base64 (whose alphabet has no `:`).
pub fn image_source(param: &str, url: &str, remote: bool) -> Result<MediaSource, ClassifiedError> {
    let url = url.trim();
    if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest.split_once(',').ok_or_else(|| {
            invalid(
                param,
                format!("{param}: a data URL needs a comma before its data"),
            )
        })?;
        if !meta.ends_with(";base64") {
            return Err(invalid(
                param,
                format!("{param}: only base64 data URLs are supported"),
            ));
        }
        return Ok(MediaSource::Inline {
            data: data.to_string(),
        });
    }
    if is_remote(url) {
        if remote {
            return Ok(MediaSource::Inline {
                data: url.to_string(),
            });
        }
        return Err(invalid(
            param,
            format!("{param}: remote image URLs are disabled on this server; send the image as a data: URL (start the server with --allow-remote-media to allow them)"),
        ));
    }
    if url.is_empty() {
        return Err(invalid(param, format!("{param} is empty")));
    }
    Ok(MediaSource::Inline {
        data: url.to_string(),
    })
}

/// The original server's top-level `images: [base64, …]`: attached, in order, to the last user
/// message, before its text.
fn attach_images(
    o: &Map<String, Value>,
    messages: &mut [ChatMessage],
    remote: bool,
) -> Result<(), ClassifiedError> {
    let Some(v) = field(o, "images") else {
        return Ok(());
    };
    let arr = v.as_array().ok_or_else(|| {
        invalid(
            "images",
            format!(
                "images must be an array of base64 strings, got {}",
                type_name(v)
            ),
        )
    })?;
    if arr.is_empty() {
        return Ok(());
    }
    let mut parts = Vec::with_capacity(arr.len());
    for (i, img) in arr.iter().enumerate() {
        let s = img.as_str().ok_or_else(|| {
            invalid(
                &format!("images[{i}]"),
                format!("images[{i}] must be a base64 string"),
            )
        })?;
        parts.push(ContentPart::Image {
            source: image_source(&format!("images[{i}]"), s, remote)?,
        });
    }
    let last_user = messages
        .iter_mut()
        .rev()
        .find(|m| m.role == Role::User)
        .ok_or_else(|| invalid("images", "images need a user message to attach to"))?;
    parts.append(&mut last_user.content);
    last_user.content = parts;
    Ok(())
}

pub(crate) fn count_media(
    messages: &[ChatMessage],
    limits: &RequestLimits,
) -> Result<(), ClassifiedError> {
    let parts = messages.iter().flat_map(|m| m.content.iter());
    let images = parts
        .clone()
        .filter(|p| matches!(p, ContentPart::Image { .. }))
        .count();
    let audio = parts
        .filter(|p| matches!(p, ContentPart::Audio { .. }))
        .count();
    if images > limits.max_images {
        return Err(invalid(
            "messages",
            format!(
                "at most {} images per request are accepted, got {images}",
                limits.max_images
            ),
        ));
    }
    if audio > limits.max_audio_clips {
        return Err(invalid(
            "messages",
            format!(
                "at most {} audio clips per request are accepted, got {audio}",
                limits.max_audio_clips
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ok(v: Value) -> ValidChatRequest {
        validate(&v, &RequestLimits::default()).unwrap()
    }

    fn err(v: Value) -> ClassifiedError {
        validate(&v, &RequestLimits::default()).unwrap_err()
    }

    #[test]
    fn minimal_and_full() {
        let r = ok(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}));
        assert_eq!(
            r.messages[0].content,
            vec![ContentPart::Text { text: "hi".into() }]
        );
        assert!(!r.stream);
        let r = ok(
            json!({"model": "m", "messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "x"}]}],
            "temperature": 0, "top_p": 1, "top_k": -1, "seed": 7, "max_tokens": 5, "stop": "\n", "stream": true,
            "stream_options": {"include_usage": true}, "unknown": 1}),
        );
        assert_eq!(r.messages[0].role, Role::System);
        assert_eq!(r.sampling.top_k, Some(0));
        assert_eq!(r.sampling.seed, Some(7));
        assert_eq!(r.stop, vec!["\n"]);
        assert!(r.include_usage);
        assert_eq!(r.max_tokens, Some(5));
    }

    #[test]
    fn errors_name_the_field() {
        let base = |k: &str, v: Value| {
            let mut b = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
            b[k] = v;
            err(b)
        };
        assert_eq!(
            base("temperature", json!(-1)).param.as_deref(),
            Some("temperature")
        );
        assert_eq!(
            base("temperature", json!("hot")).param.as_deref(),
            Some("temperature")
        );
        assert_eq!(base("top_p", json!(0)).param.as_deref(), Some("top_p"));
        assert_eq!(base("top_p", json!(1.5)).param.as_deref(), Some("top_p"));
        assert_eq!(
            base("max_tokens", json!(0)).param.as_deref(),
            Some("max_tokens")
        );
        assert_eq!(
            base("max_completion_tokens", json!(-3)).param.as_deref(),
            Some("max_completion_tokens")
        );
        assert_eq!(
            base("max_tokens", json!(1.5)).param.as_deref(),
            Some("max_tokens")
        );
        assert_eq!(
            base("stop", json!(["a", "b", "c", "d", "e"]))
                .param
                .as_deref(),
            Some("stop")
        );
        assert_eq!(base("n", json!(9)).param.as_deref(), Some("n"));
        assert_eq!(base("n", json!(0)).param.as_deref(), Some("n"));
        assert_eq!(
            base("cache_salt", json!(3)).param.as_deref(),
            Some("cache_salt")
        );
        assert_eq!(
            base("cache_salt", json!("")).param.as_deref(),
            Some("cache_salt")
        );
        assert_eq!(
            base("stream", json!("yes")).param.as_deref(),
            Some("stream")
        );
        assert_eq!(
            base("messages", json!([])).param.as_deref(),
            Some("messages")
        );
        assert_eq!(base("model", json!(3)).param.as_deref(), Some("model"));
        let e = base("messages", json!([{"role": "function", "content": "x"}]));
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
        let e = base("messages", json!([{"role": "tool", "content": "x"}]));
        assert_eq!(e.param.as_deref(), Some("messages[0].tool_call_id"));
        let e = base(
            "messages",
            json!([{"role": "user", "content": [{"type": "video"}]}]),
        );
        assert_eq!(e.param.as_deref(), Some("messages[0].content[0].type"));
        let e = base(
            "messages",
            json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]),
        );
        assert!(e.message.contains("--allow-remote-media"));
        assert!(err(json!([1])).message.contains("JSON object"));
    }

    #[test]
    fn chat_template_kwargs_are_an_object_without_reserved_names() {
        let body = |kwargs: Value| {
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                   "chat_template_kwargs": kwargs})
        };
        let r = ok(body(
            json!({"enable_thinking": true, "style": {"tone": "dry"}}),
        ));
        let kwargs = r.chat_template_kwargs.clone().unwrap();
        assert_eq!(kwargs["enable_thinking"], json!(true));
        assert_eq!(kwargs["style"]["tone"], "dry");
        let job = r.into_job("j", "m", 0, None, None);
        assert_eq!(job.chat_template_kwargs, Some(kwargs));
        // Absent, null or empty: nothing on the wire.
        assert_eq!(ok(body(json!({}))).chat_template_kwargs, None);
        assert_eq!(ok(body(Value::Null)).chat_template_kwargs, None);
        let job = ok(body(json!({}))).into_job("j", "m", 0, None, None);
        assert!(serde_json::to_value(&job)
            .unwrap()
            .get("chat_template_kwargs")
            .is_none());
        for bad in [json!(true), json!("enable_thinking"), json!([1])] {
            let e = err(body(bad));
            assert_eq!(e.class, ErrorClass::InvalidRequest);
            assert_eq!(e.param.as_deref(), Some("chat_template_kwargs"));
            assert!(e.message.contains("must be an object"), "{}", e.message);
        }
        for name in RESERVED_VARIABLES {
            let mut kwargs = json!({"enable_thinking": true});
            kwargs[*name] = json!(1);
            let e = err(body(kwargs));
            assert_eq!(e.class, ErrorClass::InvalidRequest);
            assert_eq!(
                e.param.as_deref(),
                Some(format!("chat_template_kwargs.{name}").as_str())
            );
        }
    }

    #[test]
    fn images_field_attaches_to_last_user_message_first() {
        let r = ok(json!({"model": "m", "images": ["QUJD"], "messages": [
            {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "what is this?"}]}));
        assert!(matches!(
            r.messages[2].content[0],
            ContentPart::Image { .. }
        ));
        assert_eq!(
            r.messages[2].content[1],
            ContentPart::Text {
                text: "what is this?".into()
            }
        );
        let many: Vec<Value> = (0..9).map(|_| json!("QUJD")).collect();
        let e = err(
            json!({"model": "m", "images": many, "messages": [{"role": "user", "content": "x"}]}),
        );
        assert!(e.message.contains("at most 8 images"));
    }

    #[test]
    fn the_readme_lists_every_ignored_field() {
        let readme = include_str!("../../README.md");
        let at = readme.find("**accepted and ignored**").unwrap();
        let section = &readme[at..at + 1200];
        for (name, _) in IGNORED_FIELDS {
            assert!(
                section.contains(&format!("`{name}`")) || section.contains(&format!("`{name}:")),
                "README misses {name}"
            );
        }
        // And they really are accepted.
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        for (name, _) in IGNORED_FIELDS {
            if let Some((a, b)) = name.split_once('.') {
                body[a][b] = json!(true);
            } else {
                body[*name] = if *name == "modalities" {
                    json!(["text"])
                } else {
                    json!("x")
                };
            }
        }
        ok(body);
    }

    #[test]
    fn data_urls() {
        assert_eq!(
            image_source("p", "data:image/png;base64,QUJD", false).unwrap(),
            MediaSource::Inline {
                data: "QUJD".into()
            }
        );
        assert!(image_source("p", "data:image/png,raw", false).is_err());
        assert!(image_source("p", "https://example.com/a.png", false).is_err());
        assert_eq!(
            image_source("p", "https://example.com/a.png", true).unwrap(),
            MediaSource::Inline {
                data: "https://example.com/a.png".into()
            }
        );
    }
}
