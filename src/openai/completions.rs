//! Validation of `POST /v1/completions` (OpenAI's legacy text completion) bodies: one job per
//! prompt, each prompt sent to the model as raw text (no chat template).

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::request::{
    boolean, common_fields, field, integer, invalid, logit_bias, n_field, object_and_model,
    refuse_unsupported, type_name, RequestLimits,
};
use super::{cache_scope, rand_seed};
use crate::error::ClassifiedError;
use crate::protocol::{subjects, Job, SamplingOverrides};

/// OpenAI's default `max_tokens` for text completions.
pub const DEFAULT_MAX_TOKENS: u32 = 16;
/// Most prompts one request may hold.
pub const MAX_PROMPTS: usize = 64;
/// Most `logprobs` alternatives (OpenAI allows 5; the chat endpoint's 20 here too).
pub const MAX_LOGPROBS: u32 = crate::protocol::MAX_TOP_LOGPROBS;

/// One prompt: text, or token ids.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    Text(String),
    Ids(Vec<u32>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ValidCompletionRequest {
    pub model: String,
    pub prompts: Vec<PromptInput>,
    pub sampling: SamplingOverrides,
    pub max_tokens: u32,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub echo: bool,
    /// Alternatives per token (`Some(0)`: the chosen token's log-probability only).
    pub logprobs: Option<u32>,
    pub n: u32,
    pub logit_bias: BTreeMap<u32, f32>,
    pub ignore_eos: bool,
    pub cache_salt: Option<String>,
}

fn token_ids(p: &str, a: &[Value]) -> Result<Vec<u32>, ClassifiedError> {
    if a.is_empty() {
        return Err(invalid(p, format!("{p} must not be empty")));
    }
    a.iter()
        .map(|v| {
            v.as_u64()
                .filter(|&id| id <= u32::MAX as u64)
                .map(|id| id as u32)
                .ok_or_else(|| invalid(p, format!("{p} must hold token ids (integers ≥ 0)")))
        })
        .collect()
}

/// `prompt`: a string, a list of strings, a list of token ids, or a list of such lists.
fn prompts(o: &Map<String, Value>) -> Result<Vec<PromptInput>, ClassifiedError> {
    let v = field(o, "prompt").ok_or_else(|| invalid("prompt", "prompt is required"))?;
    let list = match v {
        Value::String(s) => vec![PromptInput::Text(s.clone())],
        Value::Array(a) if a.is_empty() => {
            return Err(invalid("prompt", "prompt must not be an empty list"))
        }
        Value::Array(a) if a[0].is_number() => vec![PromptInput::Ids(token_ids("prompt", a)?)],
        Value::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, p)| match p {
                Value::String(s) => Ok(PromptInput::Text(s.clone())),
                Value::Array(ids) => Ok(PromptInput::Ids(token_ids(&format!("prompt[{i}]"), ids)?)),
                other => Err(invalid(
                    &format!("prompt[{i}]"),
                    format!(
                        "prompt[{i}] must be a string or a list of token ids, got {}",
                        type_name(other)
                    ),
                )),
            })
            .collect::<Result<_, _>>()?,
        other => {
            return Err(invalid(
                "prompt",
                format!(
                    "prompt must be a string, a list of strings or token ids, got {}",
                    type_name(other)
                ),
            ))
        }
    };
    if list.len() > MAX_PROMPTS {
        return Err(invalid(
            "prompt",
            format!(
                "at most {MAX_PROMPTS} prompts per request, got {}",
                list.len()
            ),
        ));
    }
    if let Some(i) = list
        .iter()
        .position(|p| matches!(p, PromptInput::Text(t) if t.is_empty()))
    {
        return Err(invalid("prompt", format!("prompt {i} is empty")));
    }
    Ok(list)
}

/// Validates a parsed body.
pub fn validate(
    body: &Value,
    limits: &RequestLimits,
) -> Result<ValidCompletionRequest, ClassifiedError> {
    let (o, model) = object_and_model(body)?;
    let prompts = prompts(o)?;
    if field(o, "suffix").is_some_and(|s| s.as_str() != Some("")) {
        return Err(invalid(
            "suffix",
            "suffix (insertion) is not supported by the served models",
        ));
    }
    refuse_unsupported(o)?;
    if field(o, "chat_template_kwargs").is_some() {
        return Err(invalid(
            "chat_template_kwargs",
            "text completions use no chat template; send chat_template_kwargs to /v1/chat/completions",
        ));
    }
    let n = n_field(o)?;
    match integer(o, "best_of")? {
        Some(b) if b != n as i64 => {
            return Err(invalid(
                "best_of",
                format!("best_of must equal n ({n}): candidates are not ranked here"),
            ))
        }
        _ => {}
    }
    let logprobs = match integer(o, "logprobs")? {
        None => None,
        Some(k) if (0..=MAX_LOGPROBS as i64).contains(&k) => Some(k as u32),
        Some(k) => {
            return Err(invalid(
                "logprobs",
                format!("logprobs must be between 0 and {MAX_LOGPROBS}, got {k}"),
            ))
        }
    };
    let echo = boolean(o, "echo")?;
    if echo && prompts.iter().any(|p| matches!(p, PromptInput::Ids(_))) {
        return Err(invalid(
            "echo",
            "echo needs the prompt's text; prompts given as token ids cannot be echoed here",
        ));
    }
    if echo && logprobs.is_some() {
        return Err(invalid(
            "echo",
            "echo with logprobs would need the prompt's log-probabilities, which are not computed; echo returns the prompt text only",
        ));
    }
    let c = common_fields(o, limits)?;
    let cache_salt = match field(o, "cache_salt") {
        None => None,
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(_) => {
            return Err(invalid(
                "cache_salt",
                "cache_salt must be a non-empty string",
            ))
        }
    };
    Ok(ValidCompletionRequest {
        model,
        prompts,
        sampling: c.sampling,
        max_tokens: c.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        stop: c.stop,
        stream: c.stream,
        include_usage: c.include_usage,
        echo,
        logprobs,
        n,
        logit_bias: logit_bias(o)?,
        ignore_eos: boolean(o, "ignore_eos")?,
        cache_salt,
    })
}

impl ValidCompletionRequest {
    /// One job per prompt (ids `<job_id>-<i>` past the first), all with the same seed.
    pub fn jobs(
        &self,
        job_id: &str,
        served_model: &str,
        created_ms: u64,
        deadline_ms: Option<u64>,
        api_key: Option<&str>,
    ) -> Vec<Job> {
        let mut sampling = self.sampling.clone();
        if sampling.seed.is_none() {
            sampling.seed = Some(rand_seed());
        }
        self.prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let id = if i == 0 {
                    job_id.to_string()
                } else {
                    format!("{job_id}-{i}")
                };
                Job {
                    reply_to: subjects::frames(&id),
                    job_id: id,
                    model: served_model.to_string(),
                    created_ms,
                    messages: Vec::new(),
                    sampling: sampling.clone(),
                    max_tokens: Some(self.max_tokens),
                    stop: self.stop.clone(),
                    ignore_eos: self.ignore_eos,
                    deadline_ms,
                    n: (self.n > 1).then_some(self.n),
                    cache_scope: cache_scope(api_key, self.cache_salt.as_deref()),
                    prompt: match p {
                        PromptInput::Text(t) => Some(t.clone()),
                        PromptInput::Ids(_) => None,
                    },
                    prompt_token_ids: match p {
                        PromptInput::Ids(ids) => ids.clone(),
                        PromptInput::Text(_) => Vec::new(),
                    },
                    logprobs: self.logprobs,
                    logit_bias: self.logit_bias.clone(),
                    ..Job::default()
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn v(b: Value) -> Result<ValidCompletionRequest, ClassifiedError> {
        validate(&b, &RequestLimits::default())
    }

    #[test]
    fn prompts_defaults_and_refusals() {
        let r = v(json!({"model": "m", "prompt": "Once"})).unwrap();
        assert_eq!(r.prompts, vec![PromptInput::Text("Once".into())]);
        assert_eq!(r.max_tokens, DEFAULT_MAX_TOKENS);
        let r = v(json!({"model": "m", "prompt": ["a", "b"], "n": 2, "best_of": 2, "logprobs": 3, "echo": false})).unwrap();
        assert_eq!(r.prompts.len(), 2);
        assert_eq!(r.logprobs, Some(3));
        let jobs = r.jobs("j", "m", 0, None, None);
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[1].job_id, "j-1");
        assert_eq!(jobs[0].sampling.seed, jobs[1].sampling.seed);
        assert_eq!(jobs[1].prompt.as_deref(), Some("b"));
        let param = |b: Value| v(b).unwrap_err().param.unwrap();
        assert_eq!(param(json!({"model": "m"})), "prompt");
        let r = v(json!({"model": "m", "prompt": [[2, 5], [7]]})).unwrap();
        assert_eq!(r.prompts[1], PromptInput::Ids(vec![7]));
        let jobs = r.jobs("j", "m", 0, None, None);
        assert_eq!(jobs[0].prompt_token_ids, vec![2, 5]);
        assert_eq!(jobs[0].prompt, None);
        assert_eq!(
            v(json!({"model": "m", "prompt": [4, 5]}))
                .unwrap()
                .prompts
                .len(),
            1
        );
        assert_eq!(param(json!({"model": "m", "prompt": [-1]})), "prompt");
        assert_eq!(
            param(json!({"model": "m", "prompt": [[2], "x", 3]})),
            "prompt[2]"
        );
        assert_eq!(
            param(json!({"model": "m", "prompt": [[2]], "echo": true})),
            "echo"
        );
        assert_eq!(
            param(json!({"model": "m", "prompt": "x", "suffix": "y"})),
            "suffix"
        );
        assert_eq!(
            param(json!({"model": "m", "prompt": "x", "best_of": 3})),
            "best_of"
        );
        assert_eq!(
            param(json!({"model": "m", "prompt": "x", "logprobs": 21})),
            "logprobs"
        );
        assert_eq!(
            param(json!({"model": "m", "prompt": "x", "echo": true, "logprobs": 1})),
            "echo"
        );
        assert_eq!(
            param(json!({"model": "m", "prompt": "x", "temperature": 3})),
            "temperature"
        );
        assert_eq!(
            param(
                json!({"model": "m", "prompt": "x", "chat_template_kwargs": {"enable_thinking": true}})
            ),
            "chat_template_kwargs"
        );
    }
}
