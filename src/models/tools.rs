//! Tool calling and structured outputs for chat templates without tool syntax (Gemma-3n, SmolVLM).
//!
//! **Prompt** (Google's Gemma function-calling guidance, its JSON variant): the function
//! declarations go into the system prompt (which Gemma's template puts into the first user turn),
//! with the instruction to answer a call as `{"name": …, "parameters": {…}}` and nothing else.
//! Several calls are one per line. A call in the history (an assistant message's `tool_calls`) is
//! written back the same way; a `tool` message becomes a user turn holding a fenced
//! `` ```tool_output `` block, as the guidance returns results.
//!
//! **Grammar**: `required` and a named function constrain the answer to calls whose `name` is one
//! of the functions and whose `parameters` match that function's schema. `auto` lets the model
//! choose: a call (constrained the same way) or text that does not start with `{` (or, with a
//! `response_format`, an answer in that format). So an answer that starts as a call always ends
//! as a valid one.
//!
//! **Parsing** ([`ToolStream`]): text that starts with `{` (after whitespace) is held back; at the
//! end it is parsed into calls (`finish_reason: "tool_calls"`), or, if it is not a sequence of
//! calls of known functions, sent as the text it is.

use std::borrow::Cow;

use serde_json::{json, Value};

use super::tool_syntax;
use crate::error::ClassifiedError;
use crate::pipeline::grammar::{json_layout, Grammar};
use crate::protocol::{
    ChatMessage, ContentPart, Job, ResponseFormat, Role, ToolCallFrame, ToolChoice, ToolSpec,
};

/// The tool choice a job resolves to: `None` when no tools are in play.
pub fn active_choice(job: &Job) -> Option<ToolChoice> {
    if job.tools.is_empty() {
        return None;
    }
    match job.tool_choice.clone().unwrap_or(ToolChoice::Auto) {
        ToolChoice::None => None,
        c => Some(c),
    }
}

/// Most calls one answer may make when parallel calls are allowed: small models loop in calls
/// (one per line until the token limit) where nothing bounds them.
pub const MAX_PARALLEL_CALLS: usize = 8;

fn parallel(job: &Job) -> bool {
    job.parallel_tool_calls.unwrap_or(true)
}

/// Most calls an answer to `job` may make: exactly one for a named function (as vLLM), at most one
/// without parallel calls, else [`MAX_PARALLEL_CALLS`].
pub fn max_calls(job: &Job) -> usize {
    match active_choice(job) {
        Some(ToolChoice::Function { .. }) => 1,
        _ if !parallel(job) => 1,
        _ => MAX_PARALLEL_CALLS,
    }
}

/// The grammar rule for 1 ..= `n` calls, one per line: `call ("\n" call ("\n" call)?)?`.
fn calls_rule(n: usize) -> String {
    let mut rule = "call".to_string();
    for _ in 1..n.max(1) {
        rule = format!("call (\"\\n\" {rule})?");
    }
    rule
}

/// The tools a choice shows the model (a named function: that one only).
fn shown<'a>(job: &'a Job, choice: &ToolChoice) -> Result<Vec<&'a ToolSpec>, ClassifiedError> {
    match choice {
        ToolChoice::Function { name } => {
            let t = job.tools.iter().find(|t| &t.name == name).ok_or_else(|| {
                ClassifiedError::invalid(
                    "tool_choice",
                    format!("tool_choice names the function {name:?}, which is not in tools"),
                )
            })?;
            Ok(vec![t])
        }
        _ => Ok(job.tools.iter().collect()),
    }
}

/// The system-prompt block that declares the functions.
fn declarations(job: &Job, choice: &ToolChoice) -> Result<String, ClassifiedError> {
    let tools = shown(job, choice)?;
    let list: Vec<Value> = tools
        .iter()
        .map(|t| {
            let mut o = json!({"name": t.name, "parameters": t.parameters});
            if let Some(d) = &t.description {
                o["description"] = json!(d);
            }
            o
        })
        .collect();
    let mut s = String::from(
        "You have access to functions. If you decide to invoke any of the function(s), you MUST put it in the format of\n{\"name\": function name, \"parameters\": dictionary of argument name and its value}\n\nYou SHOULD NOT include any other text in the response if you call a function.",
    );
    if max_calls(job) > 1 {
        s.push_str(" To call several functions, put each call on its own line.");
    }
    match choice {
        ToolChoice::Required => s.push_str(" You MUST call at least one function."),
        ToolChoice::Function { name } => {
            s.push_str(&format!(" You MUST call the function {name}."))
        }
        _ => {}
    }
    s.push('\n');
    s.push_str(&serde_json::to_string_pretty(&list).unwrap_or_default());
    Ok(s)
}

/// A call as the model writes it.
fn call_text(name: &str, arguments: &str) -> String {
    let params: Value = serde_json::from_str(arguments).unwrap_or(Value::String(arguments.into()));
    let v = json!({"name": name, "parameters": params});
    // The layout the grammar makes the model write.
    let s = serde_json::to_string(&v).unwrap_or_default();
    relayout(&s)
}

/// Compact JSON with `", "` and `": "` separators (serde_json writes none).
fn relayout(compact: &str) -> String {
    let mut out = String::with_capacity(compact.len() + 16);
    let mut in_str = false;
    let mut esc = false;
    for c in compact.chars() {
        out.push(c);
        if in_str {
            match (esc, c) {
                (true, _) => esc = false,
                (false, '\\') => esc = true,
                (false, '"') => in_str = false,
                _ => {}
            }
        } else {
            match c {
                '"' => in_str = true,
                ',' | ':' => out.push(' '),
                _ => {}
            }
        }
    }
    out
}

fn text_of(m: &ChatMessage) -> String {
    m.content
        .iter()
        .filter_map(|p| match p {
            ContentPart::Text { text } => Some(text.as_str()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The messages the chat template sees: tool declarations in the system prompt, history calls
/// and results as text, and consecutive turns of one role merged (Gemma's template requires
/// alternating roles). Unchanged (borrowed) when no tools are involved, or when the chat
/// template has its own tool syntax (`native`: it gets the messages and [`template_tools`] as
/// they are).
pub fn prompt_messages(job: &Job, native: bool) -> Result<Cow<'_, [ChatMessage]>, ClassifiedError> {
    if native {
        return Ok(Cow::Borrowed(&job.messages));
    }
    let choice = active_choice(job);
    let history_tools = job
        .messages
        .iter()
        .any(|m| m.role == Role::Tool || !m.tool_calls.is_empty());
    if choice.is_none() && !history_tools {
        return Ok(Cow::Borrowed(&job.messages));
    }
    let mut out: Vec<ChatMessage> = Vec::with_capacity(job.messages.len() + 1);
    if let Some(choice) = &choice {
        let block = declarations(job, choice)?;
        match job.messages.first() {
            Some(m) if m.role == Role::System => {
                let mut m = m.clone();
                let rest = text_of(&m);
                m.content = vec![ContentPart::Text {
                    text: format!("{block}\n\n{rest}"),
                }];
                out.push(m);
            }
            _ => out.push(ChatMessage::text(Role::System, block)),
        }
    }
    let skip = usize::from(
        choice.is_some() && job.messages.first().is_some_and(|m| m.role == Role::System),
    );
    for m in &job.messages[skip..] {
        let converted = match m.role {
            Role::Tool => ChatMessage::text(
                Role::User,
                format!("```tool_output\n{}\n```", text_of(m).trim()),
            ),
            Role::Assistant if !m.tool_calls.is_empty() => {
                let mut lines: Vec<String> = Vec::new();
                let t = text_of(m);
                if !t.trim().is_empty() {
                    lines.push(t);
                }
                lines.extend(
                    m.tool_calls
                        .iter()
                        .map(|c| call_text(&c.name, &c.arguments)),
                );
                ChatMessage::text(Role::Assistant, lines.join("\n"))
            }
            _ => {
                let mut m = m.clone();
                m.tool_calls.clear();
                m.tool_call_id = None;
                m
            }
        };
        match out.last_mut() {
            Some(prev) if prev.role == converted.role && prev.role != Role::System => {
                merge(prev, converted)
            }
            _ => out.push(converted),
        }
    }
    Ok(Cow::Owned(out))
}

/// Appends `next`'s parts to `prev`, its first text joined to `prev`'s last text by a blank line
/// (templates trim each text part, so a separate separator part would vanish).
fn merge(prev: &mut ChatMessage, next: ChatMessage) {
    let mut parts = next.content.into_iter().peekable();
    if let (Some(ContentPart::Text { text: a }), Some(ContentPart::Text { .. })) =
        (prev.content.last_mut(), parts.peek())
    {
        if let Some(ContentPart::Text { text: b }) = parts.next() {
            a.push_str("\n\n");
            a.push_str(&b);
        }
    }
    prev.content.extend(parts);
}

/// OpenAI's `tools` list of the functions shown, for a template with its own tool syntax.
pub fn template_tools(job: &Job) -> Result<Option<Value>, ClassifiedError> {
    let Some(choice) = active_choice(job) else {
        return Ok(None);
    };
    let list: Vec<Value> = shown(job, &choice)?
        .iter()
        .map(|t| {
            let mut f = json!({"name": t.name, "parameters": t.parameters});
            if let Some(d) = &t.description {
                f["description"] = json!(d);
            }
            json!({"type": "function", "function": f})
        })
        .collect();
    Ok(Some(Value::Array(list)))
}

/// Adds a message's `tool_calls` (arguments as an object, as transformers' templates expect) and
/// `tool_call_id` to its template form.
pub fn add_template_fields(m: &ChatMessage, obj: &mut Value) {
    if !m.tool_calls.is_empty() {
        obj["tool_calls"] = m
            .tool_calls
            .iter()
            .map(|c| {
                let args: Value = serde_json::from_str(&c.arguments)
                    .unwrap_or(Value::String(c.arguments.clone()));
                json!({"id": c.id, "type": "function",
                       "function": {"name": c.name, "arguments": args}})
            })
            .collect();
    }
    if let Some(id) = &m.tool_call_id {
        obj["tool_call_id"] = json!(id);
    }
}

/// The schema of one call of `t`.
fn call_schema(t: &ToolSpec) -> Value {
    json!({
        "type": "object",
        "properties": {"name": {"const": t.name}, "parameters": t.parameters},
        "required": ["name", "parameters"],
        "additionalProperties": false,
    })
}

/// The grammar of a response format alone (`None` = free text).
fn format_grammar(f: &ResponseFormat) -> Option<Grammar> {
    match f {
        ResponseFormat::Text => None,
        ResponseFormat::JsonObject => Some(Grammar::JsonSchema(json!({"type": "object"}))),
        ResponseFormat::JsonSchema { schema, .. } => Some(Grammar::JsonSchema(schema.clone())),
        ResponseFormat::Grammar { grammar } => Some(Grammar::Lark(grammar.clone())),
        ResponseFormat::Regex { pattern } => Some(Grammar::regex(pattern)),
    }
}

fn with_layout(mut schema: Value) -> Value {
    if let Value::Object(o) = &mut schema {
        o.entry("x-guidance").or_insert_with(json_layout);
    }
    schema
}

/// The grammar the answer is constrained to, if any: the response format's, the tool calls', or
/// (tool choice `auto`) either one. With a template's own tool syntax (`native`) the call format
/// is the model's, so calls are parsed after the fact and only a response format constrains.
/// The error names the request field at fault.
pub fn job_grammar(job: &Job, native: bool) -> Result<Option<Grammar>, ClassifiedError> {
    let format = job.response_format.as_ref().and_then(format_grammar);
    let Some(choice) = active_choice(job).filter(|_| !native) else {
        return Ok(format);
    };
    let tools = shown(job, &choice)?;
    let one = match tools.as_slice() {
        [t] => call_schema(t),
        many => json!({"anyOf": many.iter().map(|t| call_schema(t)).collect::<Vec<_>>()}),
    };
    let one = with_layout(one);
    let calls = calls_rule(max_calls(job));
    let text = match (&choice, &format, &job.response_format) {
        (ToolChoice::Auto, None, _) => Some("TEXT".to_string()),
        (ToolChoice::Auto, Some(Grammar::JsonSchema(s)), _) => {
            Some(format!("%json {}", with_layout(s.clone())))
        }
        (ToolChoice::Auto, Some(Grammar::Lark(_)), _) => {
            return Err(ClassifiedError::invalid(
                "response_format",
                "a grammar or regex response_format cannot be combined with tools (use tool_choice \"none\", or a json_schema)",
            ))
        }
        _ => None,
    };
    let start = match &text {
        Some(t) => format!("start: calls | {t}"),
        None => "start: calls".to_string(),
    };
    let lark = format!("{start}\ncalls: {calls}\ncall: %json {one}\nTEXT: /[^{{](?s:.)*/\n");
    Ok(Some(Grammar::Lark(lark)))
}

const CALL_OPEN: &str = "<tool_call>";
const CALL_CLOSE: &str = "</tool_call>";

/// A call as the model writes it; the arguments stay the text the model wrote (numbers of any
/// size included: the grammar allows what JSON allows).
#[derive(serde::Deserialize)]
struct WrittenCall<'a> {
    name: String,
    #[serde(alias = "arguments", borrow)]
    parameters: &'a serde_json::value::RawValue,
}

/// Parses an answer into calls of `tools`: one or more JSON objects `{"name", "parameters"}`
/// (or `"arguments"`), separated by whitespace, or Gemma 4's `<|tool_call>call:NAME{…}<tool_call|>`
/// blocks ([`tool_syntax`]). `None` when the text is anything else.
pub fn parse_calls(text: &str, tools: &[ToolSpec]) -> Option<Vec<(String, String)>> {
    let (calls, whole) = leading_calls(text, tools);
    (whole && !calls.is_empty()).then_some(calls)
}

/// The complete calls at the start of an answer, up to the first thing that is not one (a call cut
/// short by the token limit, an unknown function, text), and whether they were all of it.
pub fn leading_calls(text: &str, tools: &[ToolSpec]) -> (Vec<(String, String)>, bool) {
    let known = |name: &str| tools.iter().any(|t| t.name == name);
    if text.trim_start().starts_with(tool_syntax::OPEN) {
        return tool_syntax::parse_leading(text, known);
    }
    let mut calls = Vec::new();
    // Templates with their own tool syntax often wrap each call (Hermes, Qwen).
    let text = text.replace(CALL_OPEN, " ").replace(CALL_CLOSE, " ");
    for c in serde_json::Deserializer::from_str(text.trim()).into_iter::<WrittenCall>() {
        let Some((name, args)) = c.ok().filter(|c| known(&c.name)).and_then(|c| {
            let raw = c.parameters.get();
            let args = if raw.starts_with('{') {
                raw.to_string()
            } else {
                // Arguments written as a JSON string holding the object.
                let s: String = serde_json::from_str(raw).ok()?;
                s.trim_start().starts_with('{').then_some(s)?
            };
            Some((c.name, args))
        }) else {
            return (calls, false);
        };
        calls.push((name, args));
    }
    (calls, true)
}

/// A call id, stable for a job (so a redelivered job answers with the same ids).
pub fn call_id(job_id: &str, choice: usize, index: usize) -> String {
    let h = job_id.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    });
    let h = h ^ ((choice as u64) << 32 | index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    format!("call_{h:016x}")
}

/// One choice's text on its way out when tools are in play: text that may be a call is held
/// back until the answer ends.
#[derive(Debug, Default)]
pub struct ToolStream {
    held: String,
    state: StreamState,
}

#[derive(Debug, Default, PartialEq, Eq)]
enum StreamState {
    /// Only whitespace so far.
    #[default]
    Undecided,
    Text,
    Call,
}

/// What the end of a choice's answer turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub enum ToolEnd {
    /// Text still to send.
    Text(String),
    /// The answer was calls (`finish_reason: "tool_calls"`).
    Calls(Vec<ToolCallFrame>),
    /// The token limit cut the answer inside its calls: the ones that were complete (the cut one
    /// is dropped; `finish_reason` stays `"length"`).
    Cut(Vec<ToolCallFrame>),
}

impl ToolStream {
    /// The part of `text` that can be sent now.
    pub fn push(&mut self, text: &str) -> String {
        match self.state {
            StreamState::Text => text.to_string(),
            StreamState::Call => {
                self.held.push_str(text);
                String::new()
            }
            StreamState::Undecided => {
                self.held.push_str(text);
                let t = self.held.trim_start();
                let openers = [CALL_OPEN, tool_syntax::OPEN];
                if t.is_empty()
                    || openers
                        .iter()
                        .any(|o| o.starts_with(t) && t.len() < o.len())
                {
                    // Whitespace, or maybe the start of a wrapped call.
                    String::new()
                } else if t.starts_with('{') || openers.iter().any(|o| t.starts_with(o)) {
                    self.state = StreamState::Call;
                    String::new()
                } else {
                    self.state = StreamState::Text;
                    std::mem::take(&mut self.held)
                }
            }
        }
    }

    /// At the end of the answer: the calls it made (at most `max_calls`; more are dropped), or the
    /// text held back. `cut`: the token limit ended the answer, so a last call may be incomplete.
    pub fn finish(
        &mut self,
        tools: &[ToolSpec],
        job_id: &str,
        choice: usize,
        max_calls: usize,
        cut: bool,
    ) -> ToolEnd {
        let held = std::mem::take(&mut self.held);
        if self.state != StreamState::Call {
            return ToolEnd::Text(held);
        }
        let (mut calls, whole) = leading_calls(&held, tools);
        if calls.is_empty() || !(whole || cut) {
            return ToolEnd::Text(held);
        }
        calls.truncate(max_calls.max(1));
        let frames = calls
            .into_iter()
            .enumerate()
            .map(|(i, (name, arguments))| ToolCallFrame {
                index: i as u32,
                id: call_id(job_id, choice, i),
                name,
                arguments,
            })
            .collect();
        if whole {
            ToolEnd::Calls(frames)
        } else {
            ToolEnd::Cut(frames)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ToolCall;

    fn tool(name: &str) -> ToolSpec {
        ToolSpec {
            name: name.into(),
            description: Some("d".into()),
            parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
        }
    }

    fn job(tools: Vec<ToolSpec>, choice: Option<ToolChoice>, messages: Vec<ChatMessage>) -> Job {
        Job {
            tools,
            tool_choice: choice,
            messages,
            ..Job::default()
        }
    }

    #[test]
    fn no_tools_leave_messages_alone() {
        let j = job(vec![], None, vec![ChatMessage::text(Role::User, "hi")]);
        assert!(matches!(
            prompt_messages(&j, false).unwrap(),
            Cow::Borrowed(_)
        ));
        assert_eq!(job_grammar(&j, false).unwrap(), None);
    }

    #[test]
    fn declarations_history_and_merging() {
        let mut asked = ChatMessage::text(Role::Assistant, "");
        asked.tool_calls = vec![ToolCall {
            id: "c1".into(),
            name: "weather".into(),
            arguments: "{\"city\":\"Paris\"}".into(),
        }];
        asked.content.clear();
        let mut result = ChatMessage::text(Role::Tool, "sunny");
        result.tool_call_id = Some("c1".into());
        let j = job(
            vec![tool("weather")],
            None,
            vec![
                ChatMessage::text(Role::System, "be brief"),
                ChatMessage::text(Role::User, "weather in Paris?"),
                asked,
                result,
                ChatMessage::text(Role::User, "and so?"),
            ],
        );
        let m = prompt_messages(&j, false).unwrap();
        assert_eq!(m.len(), 4, "{m:?}");
        let sys = text_of(&m[0]);
        assert!(sys.starts_with("You have access to functions."));
        assert!(sys.contains("\"name\": \"weather\""));
        assert!(sys.ends_with("be brief"));
        assert_eq!(
            text_of(&m[2]),
            "{\"name\": \"weather\", \"parameters\": {\"city\": \"Paris\"}}"
        );
        assert_eq!(m[3].role, Role::User);
        assert_eq!(text_of(&m[3]), "```tool_output\nsunny\n```\n\nand so?");
    }

    #[test]
    fn grammars_per_choice() {
        let tools = vec![tool("a"), tool("b")];
        let auto = job_grammar(&job(tools.clone(), None, vec![]), false)
            .unwrap()
            .unwrap();
        let Grammar::Lark(g) = &auto else { panic!() };
        assert!(g.starts_with("start: calls | TEXT"), "{g}");
        auto.check().unwrap();
        let req = job_grammar(
            &job(tools.clone(), Some(ToolChoice::Required), vec![]),
            false,
        )
        .unwrap()
        .unwrap();
        req.check().unwrap();
        let named = job(
            tools.clone(),
            Some(ToolChoice::Function { name: "zz".into() }),
            vec![],
        );
        assert_eq!(
            job_grammar(&named, false).unwrap_err().param.as_deref(),
            Some("tool_choice")
        );
        let none = job(
            tools,
            Some(ToolChoice::None),
            vec![ChatMessage::text(Role::User, "x")],
        );
        assert_eq!(job_grammar(&none, false).unwrap(), None);
        assert!(matches!(
            prompt_messages(&none, false).unwrap(),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn parsing_and_streaming() {
        let tools = vec![tool("weather")];
        let two = "{\"name\": \"weather\", \"parameters\": {\"city\": \"A\"}}\n{\"name\": \"weather\", \"parameters\": {\"city\": \"B\"}}";
        let calls = parse_calls(two, &tools).unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[1].1, "{\"city\": \"B\"}");
        // Numbers past f64 are still JSON.
        let big = "{\"name\": \"weather\", \"parameters\": {\"city\": 27E+059244000706410}}";
        assert_eq!(
            parse_calls(big, &tools).unwrap()[0].1,
            "{\"city\": 27E+059244000706410}"
        );
        assert!(parse_calls("{\"name\": \"other\", \"parameters\": {}}", &tools).is_none());
        assert!(parse_calls("hello", &tools).is_none());
        assert!(parse_calls("{\"name\": \"weather\"", &tools).is_none());

        let mut s = ToolStream::default();
        assert_eq!(s.push("  "), "");
        assert_eq!(s.push("{\"name\": \"weather\", "), "");
        assert_eq!(s.push("\"parameters\": {\"city\": \"A\"}}"), "");
        let ToolEnd::Calls(c) = s.finish(&tools, "job", 0, 8, false) else {
            panic!()
        };
        assert_eq!(c[0].name, "weather");
        assert_eq!(c[0].id, call_id("job", 0, 0));
        assert_ne!(call_id("job", 0, 0), call_id("job", 0, 1));

        let mut s = ToolStream::default();
        assert_eq!(s.push(" "), "");
        assert_eq!(s.push("Hi"), " Hi");
        assert_eq!(s.push("!"), "!");
        assert_eq!(
            s.finish(&tools, "job", 0, 8, false),
            ToolEnd::Text(String::new())
        );

        let mut s = ToolStream::default();
        assert_eq!(s.push("<tool"), "");
        assert_eq!(
            s.push("_call>{\"name\": \"weather\", \"arguments\": {}}</tool_call>"),
            ""
        );
        let ToolEnd::Calls(c) = s.finish(&tools, "job", 0, 8, false) else {
            panic!()
        };
        assert_eq!(c[0].arguments, "{}");
        let mut s = ToolStream::default();
        assert_eq!(s.push("<b>"), "<b>");

        let mut s = ToolStream::default();
        assert_eq!(s.push("{not a call"), "");
        assert_eq!(
            s.finish(&tools, "job", 0, 8, false),
            ToolEnd::Text("{not a call".into())
        );
    }

    #[test]
    fn calls_are_bounded_and_a_cut_answer_keeps_its_complete_calls() {
        let tools = vec![tool("weather"), tool("time")];
        let msgs = vec![ChatMessage::text(Role::User, "x")];
        let named = job(
            tools.clone(),
            Some(ToolChoice::Function {
                name: "time".into(),
            }),
            msgs.clone(),
        );
        assert_eq!(max_calls(&named), 1);
        let Some(Grammar::Lark(g)) = job_grammar(&named, false).unwrap() else {
            panic!()
        };
        assert!(g.contains("calls: call\n"), "{g}");
        let mut serial = job(tools.clone(), Some(ToolChoice::Required), msgs.clone());
        serial.parallel_tool_calls = Some(false);
        assert_eq!(max_calls(&serial), 1);
        let parallel = job(tools.clone(), None, msgs);
        assert_eq!(max_calls(&parallel), MAX_PARALLEL_CALLS);
        let Some(Grammar::Lark(g)) = job_grammar(&parallel, false).unwrap() else {
            panic!()
        };
        assert_eq!(
            g.matches("call (\"\\n\"").count(),
            MAX_PARALLEL_CALLS - 1,
            "{g}"
        );
        assert!(!g.contains("call)*"), "{g}");
        // The rule compiles and bounds the count (the grammar engine is the judge).
        assert_eq!(calls_rule(1), "call");
        assert_eq!(calls_rule(2), "call (\"\\n\" call)?");

        // Cut by the token limit inside the third call: the two complete ones are kept.
        let a = "{\"name\": \"weather\", \"parameters\": {\"city\": \"A\"}}";
        let cut = format!("{a}\n{a}\n{{\"name\": \"wea");
        let mut s = ToolStream::default();
        assert_eq!(s.push(&cut), "");
        let ToolEnd::Cut(c) = s.finish(&tools, "job", 0, 8, true) else {
            panic!()
        };
        assert_eq!(c.len(), 2);
        assert_eq!(c[1].arguments, "{\"city\": \"A\"}");
        // Not cut, the same text is not calls: it stays text.
        let mut s = ToolStream::default();
        s.push(&cut);
        assert_eq!(
            s.finish(&tools, "job", 0, 8, false),
            ToolEnd::Text(cut.clone())
        );
        // Cut before any call was complete: text.
        let mut s = ToolStream::default();
        s.push("{\"name\": \"wea");
        assert!(matches!(
            s.finish(&tools, "job", 0, 8, true),
            ToolEnd::Text(_)
        ));
        // More calls than allowed (a template's own syntax is not grammar-bounded): the first ones.
        let mut s = ToolStream::default();
        s.push(&format!("{a}\n{a}\n{a}"));
        let ToolEnd::Calls(c) = s.finish(&tools, "job", 0, 1, false) else {
            panic!()
        };
        assert_eq!(c.len(), 1);
        // Gemma 4's syntax, cut in its second block.
        let g4 =
            "<|tool_call>call:weather{city:<|\"|>A<|\"|>}<tool_call|><|tool_call>call:weather{ci";
        let mut s = ToolStream::default();
        s.push(g4);
        let ToolEnd::Cut(c) = s.finish(&tools, "job", 0, 8, true) else {
            panic!()
        };
        assert_eq!((c.len(), c[0].arguments.as_str()), (1, "{\"city\":\"A\"}"));
    }
}
