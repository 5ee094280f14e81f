//! The wire types and `schemas/v1/*.schema.json` agree: what the code writes validates against the
//! schemas, what a schema-valid foreign producer writes parses, and unknown fields are ignored.

mod common;

use onnx_chat::error::ErrorClass;
use onnx_chat::protocol::*;
use serde_json::{json, Value};

fn schema(name: &str) -> jsonschema::Validator {
    let v = common::read_json(
        &common::root()
            .join("schemas/v1")
            .join(format!("{name}.schema.json")),
    );
    jsonschema::validator_for(&v).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn assert_valid(name: &str, instance: &Value) {
    let s = schema(name);
    let errors: Vec<String> = s.iter_errors(instance).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{name}: {instance}\n{errors:?}");
}

fn assert_invalid(name: &str, instance: &Value) {
    assert!(
        !schema(name).is_valid(instance),
        "{name} should reject {instance}"
    );
}

fn sample_job() -> Job {
    Job {
        job_id: "6f1c".into(),
        model: "tiny-gemma3n".into(),
        reply_to: subjects::frames("6f1c"),
        progress_to: Some(subjects::progress("6f1c")),
        created_ms: 1,
        messages: vec![
            ChatMessage::text(Role::System, "be brief"),
            ChatMessage {
                role: Role::Assistant,
                content: vec![],
                tool_calls: vec![ToolCall {
                    id: "call_1".into(),
                    name: "weather".into(),
                    arguments: "{\"city\": \"Oslo\"}".into(),
                }],
                tool_call_id: None,
            },
            ChatMessage {
                tool_call_id: Some("call_1".into()),
                ..ChatMessage::text(Role::Tool, "sunny")
            },
            ChatMessage {
                tool_calls: vec![],
                tool_call_id: None,
                role: Role::User,
                content: vec![
                    ContentPart::Image {
                        source: MediaSource::Inline {
                            data: "QUJD".into(),
                        },
                    },
                    ContentPart::Audio {
                        source: MediaSource::ObjectStore {
                            bucket: "onnxchat-media".into(),
                            key: "6f1c/0".into(),
                            size: 10,
                            sha256: Some("ab".repeat(32)),
                        },
                        format: Some("wav".into()),
                    },
                    ContentPart::Text {
                        text: "what?".into(),
                    },
                ],
            },
        ],
        sampling: SamplingOverrides {
            temperature: Some(0.0),
            seed: Some(5),
            top_k: Some(0),
            ..Default::default()
        },
        max_tokens: Some(8),
        stop: vec!["\n".into()],
        ignore_eos: true,
        deadline_ms: Some(2),
        n: Some(2),
        cache_scope: Some("0123abcd".into()),
        prompt: None,
        prompt_token_ids: vec![],
        response_format: Some(ResponseFormat::JsonSchema {
            schema: json!({"type": "object"}),
            name: Some("answer".into()),
        }),
        tools: vec![ToolSpec {
            name: "weather".into(),
            description: Some("today's weather".into()),
            parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}}),
        }],
        tool_choice: Some(ToolChoice::Function {
            name: "weather".into(),
        }),
        parallel_tool_calls: Some(false),
        logprobs: Some(2),
        logit_bias: [(5u32, -100.0f32)].into_iter().collect(),
        chat_template_kwargs: json!({"enable_thinking": true, "style": {"tone": "dry"}})
            .as_object()
            .cloned(),
        clamp_max_tokens: true,
        count_only: false,
    }
}

#[test]
fn progress_requests_and_replies_validate_both_ways() {
    let req = ProgressRequest {
        job_id: "6f1c".into(),
        worker_id: Some("w1".into()),
    };
    assert_valid("progress", &serde_json::to_value(&req).unwrap());
    let reply = Progress {
        attempt: 2,
        next_seq: 5,
        choices: vec![ChoiceProgress {
            index: 0,
            token_ids: vec![3, 4],
            closed: true,
        }],
        done: false,
    };
    let v = serde_json::to_value(&reply).unwrap();
    assert_valid("progress", &v);
    assert_eq!(serde_json::from_value::<Progress>(v).unwrap(), reply);
    // A minimal foreign reply: the first attempt, nothing delivered.
    let minimal: Progress = serde_json::from_value(json!({"attempt": 1, "extra": 0})).unwrap();
    assert_eq!(
        minimal,
        Progress {
            attempt: 1,
            ..Progress::default()
        }
    );
    assert_invalid("progress", &json!({"next_seq": 1}));
    assert_invalid("progress", &json!({"attempt": 0}));
}

#[test]
fn code_output_validates() {
    assert_valid("job", &serde_json::to_value(sample_job()).unwrap());
    let frames = [
        FrameBody::Delta {
            text: "hi".into(),
            reasoning: String::new(),
            token_ids: vec![1, 2],
            index: 1,
            logprobs: vec![],
            tool_calls: vec![],
        },
        FrameBody::Delta {
            text: String::new(),
            reasoning: "Let me think.".into(),
            token_ids: vec![3, 7],
            index: 0,
            logprobs: vec![TokenLogprob {
                token: "{".into(),
                logprob: -0.5,
                bytes: vec![123],
                top_logprobs: vec![TopLogprob {
                    token: "{".into(),
                    logprob: -0.5,
                    bytes: vec![123],
                }],
            }],
            tool_calls: vec![ToolCallFrame {
                index: 0,
                id: "call_1".into(),
                name: "weather".into(),
                arguments: "{}".into(),
            }],
        },
        FrameBody::Done(DoneBody {
            finish_reason: FinishReason::ToolCalls,
            usage: Usage::new(3, 4),
            timings: Timings::default(),
            choices: vec![],
            stop_sequence: None,
            heartbeat: None,
        }),
        FrameBody::Done(DoneBody {
            finish_reason: FinishReason::Length,
            usage: Usage::new(3, 4),
            timings: Timings::default(),
            choices: vec![],
            stop_sequence: None,
            heartbeat: None,
        }),
        FrameBody::Done(DoneBody {
            finish_reason: FinishReason::Stop,
            usage: Usage::new(3, 9).with_cached(2).with_reasoning(6),
            timings: Timings::default(),
            choices: vec![
                ChoiceEnd {
                    index: 0,
                    finish_reason: FinishReason::Stop,
                    completion_tokens: 4,
                },
                ChoiceEnd {
                    index: 1,
                    finish_reason: FinishReason::Length,
                    completion_tokens: 5,
                },
            ],
            stop_sequence: Some("\n\n".into()),
            heartbeat: None,
        }),
        FrameBody::Error {
            error: WireError {
                class: ErrorClass::ContextLengthExceeded,
                message: "too long".into(),
                param: Some("messages".into()),
            },
        },
    ];
    for (i, body) in frames.into_iter().enumerate() {
        let f = Frame {
            job_id: "6f1c".into(),
            seq: i as u64,
            attempt: 1,
            body,
        };
        assert_valid("frame", &serde_json::to_value(f).unwrap());
    }
    assert_valid(
        "cancel",
        &serde_json::to_value(CancelRequest {
            job_id: "x".into(),
            reason: None,
        })
        .unwrap(),
    );
    for reply in [
        OfferReply {
            accepted: true,
            reason: None,
        },
        OfferReply {
            accepted: false,
            reason: Some("no free slot".into()),
        },
    ] {
        let v = serde_json::to_value(&reply).unwrap();
        assert_valid("offer_reply", &v);
        assert_eq!(serde_json::from_value::<OfferReply>(v).unwrap(), reply);
    }
    assert_invalid("offer_reply", &json!({"reason": "x"}));
    let hb = WorkerHeartbeat {
        worker_id: "w".into(),
        models: vec![WorkerModel {
            name: "m".into(),
            aliases: vec!["m/FP32".into()],
            context_length: 4096,
            quant: Some("FP32".into()),
            vision: true,
            audio: true,
            created: 1,
            prefixes: vec!["0123456789abcdef".into()],
            max_token_bytes: Some(18),
        }],
        max_concurrent: 4,
        active: 0,
        ttl_ms: 6000,
        draining: false,
        version: Some("0.1.0".into()),
        completed: 3,
        started_ms: 1_700_000_000_000,
    };
    assert_valid("heartbeat", &serde_json::to_value(&hb).unwrap());
    // A final frame carries the worker's heartbeat.
    let done = Frame {
        job_id: "j".into(),
        seq: 3,
        attempt: 1,
        body: FrameBody::Done(DoneBody {
            finish_reason: FinishReason::Stop,
            usage: Usage::new(3, 4),
            timings: Timings::default(),
            choices: vec![],
            stop_sequence: None,
            heartbeat: Some(Box::new(hb.clone())),
        }),
    };
    let v = serde_json::to_value(&done).unwrap();
    assert_valid("frame", &v);
    assert_eq!(v["heartbeat"]["worker_id"], "w");
    assert_invalid("frame", &{
        let mut bad = v.clone();
        bad["heartbeat"] = json!("w");
        bad
    });
    // Every error class the code can produce is in the schema's enum.
    for c in [
        ErrorClass::InvalidRequest,
        ErrorClass::ContextLengthExceeded,
        ErrorClass::Unauthorized,
        ErrorClass::ModelNotFound,
        ErrorClass::PayloadTooLarge,
        ErrorClass::Unprocessable,
        ErrorClass::Overloaded,
        ErrorClass::Timeout,
        ErrorClass::Cancelled,
        ErrorClass::Unavailable,
        ErrorClass::Internal,
    ] {
        let f = json!({"job_id": "j", "seq": 0, "type": "error", "error": {"class": c, "message": "m"}});
        assert_valid("frame", &f);
    }
}

#[test]
fn reasoning_and_template_kwargs_on_the_wire() {
    // The job carries chat_template_kwargs as given; absent stays absent.
    let job = sample_job();
    let v = serde_json::to_value(&job).unwrap();
    assert_eq!(v["chat_template_kwargs"]["enable_thinking"], json!(true));
    assert_eq!(serde_json::from_value::<Job>(v).unwrap(), job);
    let plain = serde_json::to_value(Job {
        chat_template_kwargs: None,
        ..sample_job()
    })
    .unwrap();
    assert!(plain.get("chat_template_kwargs").is_none());
    assert_valid("job", &plain);
    // The schema refuses exactly the names the renderer sets, and any non-object.
    let with = |kwargs: Value| {
        let mut j = plain.clone();
        j["chat_template_kwargs"] = kwargs;
        j
    };
    for name in onnx_chat::pipeline::template::RESERVED_VARIABLES {
        let mut kwargs = json!({"enable_thinking": true});
        kwargs[*name] = json!(1);
        assert_invalid("job", &with(kwargs));
    }
    assert_valid(
        "job",
        &with(json!({"enable_thinking": false, "documents_x": 1})),
    );
    assert_invalid("job", &with(json!(true)));
    let schema = common::read_json(&common::root().join("schemas/v1/job.schema.json"));
    let reserved = &schema["properties"]["chat_template_kwargs"]["propertyNames"]["not"]["enum"];
    assert_eq!(
        reserved,
        &json!(onnx_chat::pipeline::template::RESERVED_VARIABLES)
    );

    // A delta with reasoning only; the field is absent when empty and defaults when missing.
    let delta = |reasoning: &str| Frame {
        job_id: "j".into(),
        seq: 0,
        attempt: 1,
        body: FrameBody::Delta {
            text: String::new(),
            reasoning: reasoning.into(),
            token_ids: vec![4],
            index: 0,
            logprobs: vec![],
            tool_calls: vec![],
        },
    };
    let v = serde_json::to_value(delta("hmm")).unwrap();
    assert_eq!(v["reasoning"], "hmm");
    assert_valid("frame", &v);
    let v = serde_json::to_value(delta("")).unwrap();
    assert!(v.get("reasoning").is_none());
    assert_eq!(serde_json::from_value::<Frame>(v).unwrap(), delta(""));
    assert_invalid(
        "frame",
        &json!({"job_id": "j", "seq": 0, "type": "delta", "text": "", "reasoning": 3}),
    );

    // Usage reports reasoning tokens only when there were some.
    let v = serde_json::to_value(Usage::new(3, 9).with_reasoning(6)).unwrap();
    assert_eq!(v["completion_tokens_details"]["reasoning_tokens"], 6);
    let v = serde_json::to_value(Usage::new(3, 9).with_reasoning(0)).unwrap();
    assert!(v.get("completion_tokens_details").is_none());
    let done = json!({"job_id": "j", "seq": 1, "type": "done", "finish_reason": "length",
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3,
                  "completion_tokens_details": {"reasoning_tokens": -1}}});
    assert_invalid("frame", &done);
}

#[test]
fn foreign_minimal_messages_parse_and_bad_ones_are_rejected() {
    // What another program may publish: only required fields, plus fields from a future version.
    let job = json!({
        "job_id": "a", "model": "tiny-gemma3n", "reply_to": "my.inbox.a",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "priority": 5
    });
    assert_valid("job", &job);
    let parsed: Job = serde_json::from_value(job).unwrap();
    assert_eq!(parsed.sampling, SamplingOverrides::default());
    assert_eq!(parsed.max_tokens, None);
    let frame = json!({"job_id": "a", "seq": 0, "type": "delta", "text": "x"});
    assert_valid("frame", &frame);
    let f: Frame = serde_json::from_value(frame).unwrap();
    assert_eq!(f.attempt, 1);

    assert_invalid(
        "job",
        &json!({"job_id": "a", "model": "m", "reply_to": "r", "messages": []}),
    );
    assert_invalid(
        "job",
        &json!({"job_id": "a", "model": "m", "reply_to": "r", "messages": [{"role": "tool", "content": []}]}),
    );
    assert_invalid("frame", &json!({"job_id": "a", "seq": 0, "type": "done"}));
    assert_invalid(
        "frame",
        &json!({"job_id": "a", "seq": -1, "type": "delta", "text": ""}),
    );
    assert_invalid(
        "frame",
        &json!({"job_id": "a", "seq": 0, "type": "error", "error": {"class": "oops", "message": "m"}}),
    );
}
