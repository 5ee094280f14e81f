//! Typed parsing of request bodies, shared by the API adapters ([`crate::anthropic`], the Responses
//! API): wire structs derive `Deserialize` and are read through `serde_path_to_error`, so a 400 names
//! the exact field (`messages[0].content[1].source.data`) as the hand-written chat validation does.
//! Internally tagged unions (`{"type": …}`) go through [`tagged_enum!`](crate::tagged_enum), which keeps
//! the path of an error inside a variant (serde's derive buffers the object and loses it).

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::ClassifiedError;

/// A string, or a list of blocks (`system`, message `content`, `tool_result` content).
#[derive(Debug)]
pub enum TextOrBlocks<T> {
    Text(String),
    Blocks(Vec<T>),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for TextOrBlocks<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for V<T> {
            type Value = TextOrBlocks<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or an array of content blocks")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Self::Value, E> {
                Ok(TextOrBlocks::Text(s.to_string()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<Self::Value, A::Error> {
                // Through the caller's sequence, so errors keep their element's path.
                Vec::<T>::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
                    .map(TextOrBlocks::Blocks)
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// An internally tagged enum (`{"type": "<tag>", …}`) of one struct per variant, read through
/// [`tagged`] and [`nested`]: serde's derive buffers such objects, which loses the path of an error
/// inside a variant; this keeps it. An unknown tag is an error at `type` listing the known ones.
#[macro_export]
macro_rules! tagged_enum {
    ($(#[$m:meta])* $name:ident { $($tag:literal => $variant:ident($inner:ty)),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug)]
        pub enum $name {
            $($variant($inner)),+
        }

        impl<'de> ::serde::Deserialize<'de> for $name {
            fn deserialize<D: ::serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let (kind, v) = $crate::wire::tagged::<D>(d)?;
                match kind.as_str() {
                    $($tag => $crate::wire::nested(v).map($name::$variant),)+
                    other => Err($crate::wire::at::<D::Error>(
                        "type",
                        &format!(
                            "unknown variant `{other}`, expected one of {}",
                            [$(concat!("`", $tag, "`")),+].join(", ")
                        ),
                    )),
                }
            }
        }
    };
}

/// Marks the path inside a nested value in an error message (see [`split_nested`]).
const AT: char = '\u{1}';

/// An error at `path` below the value being read.
pub fn at<E: serde::de::Error>(path: &str, msg: &str) -> E {
    E::custom(format!("{AT}{path}{AT}{msg}"))
}

/// `(path inside, message)` of an error made by [`at`]; no path for any other.
pub fn split_nested(msg: &str) -> (&str, &str) {
    msg.strip_prefix(AT)
        .and_then(|r| r.split_once(AT))
        .unwrap_or(("", msg))
}

/// `a` then `b`, as a field path (`.` is the root; `b` may start with an index).
pub fn join_path(a: &str, b: &str) -> String {
    match (a, b) {
        (".", b) | ("", b) => b.to_string(),
        (a, "") => a.to_string(),
        (a, b) if b.starts_with('[') => format!("{a}{b}"),
        (a, b) => format!("{a}.{b}"),
    }
}

/// A tagged object's `type` and the object.
pub fn tagged<'de, D: serde::Deserializer<'de>>(d: D) -> Result<(String, Value), D::Error> {
    let map = Map::<String, Value>::deserialize(d)?;
    match map.get("type") {
        Some(Value::String(t)) => Ok((t.clone(), Value::Object(map))),
        Some(_) => Err(at::<D::Error>("type", "must be a string")),
        None => Err(serde::de::Error::missing_field("type")),
    }
}

/// Reads `T` from a buffered value, errors keeping their path.
pub fn nested<T: serde::de::DeserializeOwned, E: serde::de::Error>(v: Value) -> Result<T, E> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let inner = e.inner().to_string();
        let (sub, msg) = split_nested(&inner);
        at(&join_path(&e.path().to_string(), sub), msg)
    })
}

/// The 400 for a body that does not parse: the field's path and serde's reason.
fn parse_error(e: serde_path_to_error::Error<serde_json::Error>) -> ClassifiedError {
    let inner = e.inner().to_string();
    // serde_json appends " at line L column C": the path says where.
    let inner = inner
        .rsplit_once(" at line ")
        .map_or(inner.as_str(), |(r, _)| r);
    let (sub, reason) = split_nested(inner);
    let path = join_path(&e.path().to_string(), sub);
    // "missing field `x`" names a field below the path serde stopped at.
    let param = match reason
        .strip_prefix("missing field `")
        .and_then(|r| r.split('`').next())
    {
        Some(f) => join_path(&path, f),
        None if path.is_empty() => "body".to_string(),
        None => path,
    };
    ClassifiedError::invalid(&param, format!("{param}: {reason}"))
}

/// Parses a request body into its wire type; a 400 names the field at fault (`param`) and says why.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ClassifiedError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(parse_error)
}

/// A 400 naming `param`.
pub fn invalid(param: &str, msg: impl Into<String>) -> ClassifiedError {
    ClassifiedError::invalid(param, msg)
}

/// A 400 naming `param`: `what` is known but not supported here.
pub fn unsupported(param: &str, what: &str) -> ClassifiedError {
    invalid(
        param,
        format!("{param}: {what} is not supported by this server"),
    )
}

/// `v` when absent or within `0 ..= max`, else a 400 naming `param`.
pub fn in_range(param: &str, v: Option<f32>, max: f32) -> Result<Option<f32>, ClassifiedError> {
    match v {
        Some(x) if !(0.0..=max).contains(&x) => Err(invalid(
            param,
            format!("{param} must be between 0 and {max}, got {x}"),
        )),
        v => Ok(v),
    }
}
