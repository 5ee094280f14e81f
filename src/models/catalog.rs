//! Model families, the display names users of the original Python server know, and quantization
//! names → per-component ONNX file suffixes (model_interface.md §1.1, §4).

use std::fmt;

/// A model family: which graphs it has and how its files are named. Chosen from `config.json`'s
/// `model_type`, never from the model's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    Gemma3n,
    /// SmolVLM v1 (Idefics3 architecture: SigLIP tiles + pixel shuffle + Llama).
    SmolVlm,
    /// Granite Vision 3.x (LLaVA-NeXT: SigLIP anyres tiles + MLP projector + Granite), exported by
    /// `tools/export/granite_vision.py`.
    GraniteVision,
}

impl Family {
    pub const ALL: &'static [Family] = &[Family::Gemma3n, Family::SmolVlm, Family::GraniteVision];

    pub fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "gemma3n" => Some(Self::Gemma3n),
            "idefics3" | "smolvlm" => Some(Self::SmolVlm),
            "llava_next" => Some(Self::GraniteVision),
            _ => None,
        }
    }

    /// The `config.json` model types that select this family.
    pub fn model_types(self) -> &'static [&'static str] {
        match self {
            Self::Gemma3n => &["gemma3n"],
            Self::SmolVlm => &["idefics3", "smolvlm"],
            Self::GraniteVision => &["llava_next"],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Gemma3n => "gemma3n",
            Self::SmolVlm => "smolvlm",
            Self::GraniteVision => "granite_vision",
        }
    }

    /// The graphs of this family, required ones first.
    pub fn components(self) -> &'static [Component] {
        match self {
            Self::Gemma3n => &[
                Component::EmbedTokens,
                Component::DecoderModelMerged,
                Component::VisionEncoder,
                Component::AudioEncoder,
            ],
            Self::SmolVlm | Self::GraniteVision => &[
                Component::EmbedTokens,
                Component::DecoderModelMerged,
                Component::VisionEncoder,
            ],
        }
    }

    pub fn default_quant(self) -> Quant {
        match self {
            Self::Gemma3n => Quant::Q4Mixed,
            // The original server's default for SmolVLM (its smallest-first priority list starts with UINT8).
            Self::SmolVlm => Quant::Uint8,
            // What the export recipe makes by default: q4 decoder, int8 embeddings and vision encoder.
            Self::GraniteVision => Quant::Q4Mixed,
        }
    }

    /// The quantization names this family accepts.
    pub fn quants(self) -> &'static [Quant] {
        match self {
            Self::Gemma3n => &[
                Quant::Q4Mixed,
                Quant::Q4,
                Quant::Q4F16,
                Quant::Quantized,
                Quant::Int8,
                Quant::Uint8,
                Quant::Bnb4,
                Quant::Fp16,
                Quant::Fp32,
            ],
            // model_interface.md §4.1: the original server's SmolVLM names (no Q4_MIXED).
            Self::SmolVlm => &[
                Quant::Fp32,
                Quant::Fp16,
                Quant::Int8,
                Quant::Uint8,
                Quant::Q4,
                Quant::Q4F16,
                Quant::Bnb4,
                Quant::Quantized,
            ],
            // The sets tools/export/granite_vision.py writes (INT8 and Q8 name its `_quantized` set).
            Self::GraniteVision => &[
                Quant::Q4Mixed,
                Quant::Q4,
                Quant::Quantized,
                Quant::Int8,
                Quant::Fp32,
            ],
        }
    }

    /// The file suffix each component prefers under `quant`.
    pub fn preferred_suffix(self, quant: Quant, component: Component) -> &'static str {
        match quant {
            Quant::Q4Mixed => match component {
                Component::EmbedTokens | Component::VisionEncoder => "_quantized",
                Component::DecoderModelMerged | Component::AudioEncoder => "_q4",
            },
            other => other.uniform_suffix(),
        }
    }

    /// Suffixes to try, in order, when the preferred file is missing (model_interface.md §4.2 rule 3).
    pub fn candidate_suffixes(self, quant: Quant, component: Component) -> Vec<&'static str> {
        let fallbacks: &[&str] = match (self, component) {
            // SmolVLM exports do not have every suffix for every graph (a public mirror of the repo has no
            // `embed_tokens_quantized` and no `vision_encoder_uint8`): any 8-bit variant, then fp16, fp32.
            (Self::SmolVlm, _) => &["_uint8", "_quantized", "_int8", "_fp16", ""],
            // The export recipe has no `_q4` embedding table (no MatMul to quantize) and names int8 `_quantized`.
            (Self::GraniteVision, _) => &["_quantized", "_int8", ""],
            (Self::Gemma3n, Component::EmbedTokens) => &["_quantized", "_fp16", ""],
            (Self::Gemma3n, Component::VisionEncoder) => &["_quantized", "_uint8", "_fp16", ""],
            (Self::Gemma3n, Component::AudioEncoder) => &["_q4", "_quantized", "_fp16", ""],
            (Self::Gemma3n, Component::DecoderModelMerged) => &["_q4", "_quantized", "_fp16", ""],
        };
        let mut out = vec![self.preferred_suffix(quant, component)];
        for s in fallbacks {
            if !out.contains(s) {
                out.push(s);
            }
        }
        out
    }
}

/// One ONNX graph of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    EmbedTokens,
    DecoderModelMerged,
    VisionEncoder,
    AudioEncoder,
}

impl Component {
    pub fn file_stem(self) -> &'static str {
        match self {
            Self::EmbedTokens => "embed_tokens",
            Self::DecoderModelMerged => "decoder_model_merged",
            Self::VisionEncoder => "vision_encoder",
            Self::AudioEncoder => "audio_encoder",
        }
    }

    /// Text-only serving needs these; the encoders are optional (requests with media then get a 400).
    pub fn required(self) -> bool {
        matches!(self, Self::EmbedTokens | Self::DecoderModelMerged)
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.file_stem())
    }
}

/// Quantization names as the original server spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Quant {
    /// q4 decoder and audio encoder, int8 embeddings and vision encoder (the original server's default).
    Q4Mixed,
    /// `_q4` where a component has one, with the fallbacks of [`Family::candidate_suffixes`].
    Q4,
    Q4F16,
    /// `_quantized` (transformers.js "q8": dynamic int8).
    Quantized,
    Int8,
    Uint8,
    Bnb4,
    Fp16,
    Fp32,
}

pub const QUANT_NAMES: &[&str] = &[
    "Q4_MIXED",
    "Q4",
    "Q4_F16",
    "QUANTIZED",
    "INT8",
    "UINT8",
    "BNB4",
    "FP16",
    "FP32",
];

impl Quant {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_uppercase().replace('-', "_").as_str() {
            "Q4_MIXED" => Self::Q4Mixed,
            "Q4" => Self::Q4,
            "Q4_F16" | "Q4F16" => Self::Q4F16,
            "QUANTIZED" | "Q8" => Self::Quantized,
            "INT8" => Self::Int8,
            "UINT8" => Self::Uint8,
            "BNB4" => Self::Bnb4,
            "FP16" => Self::Fp16,
            "FP32" => Self::Fp32,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Q4Mixed => "Q4_MIXED",
            Self::Q4 => "Q4",
            Self::Q4F16 => "Q4_F16",
            Self::Quantized => "QUANTIZED",
            Self::Int8 => "INT8",
            Self::Uint8 => "UINT8",
            Self::Bnb4 => "BNB4",
            Self::Fp16 => "FP16",
            Self::Fp32 => "FP32",
        }
    }

    fn uniform_suffix(self) -> &'static str {
        match self {
            Self::Q4Mixed | Self::Q4 => "_q4",
            Self::Q4F16 => "_q4f16",
            Self::Quantized => "_quantized",
            Self::Int8 => "_int8",
            Self::Uint8 => "_uint8",
            Self::Bnb4 => "_bnb4",
            Self::Fp16 => "_fp16",
            Self::Fp32 => "",
        }
    }
}

impl fmt::Display for Quant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A model known by a display name.
#[derive(Debug, Clone, Copy)]
pub struct CatalogEntry {
    pub display: &'static str,
    pub repo: &'static str,
    pub family: Family,
}

pub const CATALOG: &[CatalogEntry] = &[
    CatalogEntry {
        display: "Gemma-3n-E2B-it-ONNX",
        repo: "onnx-community/gemma-3n-E2B-it-ONNX",
        family: Family::Gemma3n,
    },
    CatalogEntry {
        display: "SmolVLM-256M-Instruct",
        repo: "HuggingFaceTB/SmolVLM-256M-Instruct",
        family: Family::SmolVlm,
    },
    // No ONNX export is published: the repo id names the checkpoint tools/export/granite_vision.py
    // exports (serve the exported directory, or a hub cache entry holding it).
    CatalogEntry {
        display: "granite-vision-3.2-2b",
        repo: "ibm-granite/granite-vision-3.2-2b",
        family: Family::GraniteVision,
    },
];

/// The model `make run` serves by default.
pub const DEFAULT_MODEL: &str = "Gemma-3n-E2B-it-ONNX/Q4_MIXED";

pub fn by_display(name: &str) -> Option<&'static CatalogEntry> {
    CATALOG
        .iter()
        .find(|e| e.display.eq_ignore_ascii_case(name))
}

pub fn by_repo(repo: &str) -> Option<&'static CatalogEntry> {
    CATALOG.iter().find(|e| e.repo.eq_ignore_ascii_case(repo))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_mixed_matches_the_original_server() {
        let f = Family::Gemma3n;
        let q = Quant::Q4Mixed;
        assert_eq!(f.preferred_suffix(q, Component::EmbedTokens), "_quantized");
        assert_eq!(f.preferred_suffix(q, Component::DecoderModelMerged), "_q4");
        assert_eq!(
            f.preferred_suffix(q, Component::VisionEncoder),
            "_quantized"
        );
        assert_eq!(f.preferred_suffix(q, Component::AudioEncoder), "_q4");
        assert_eq!(
            f.candidate_suffixes(Quant::Fp32, Component::VisionEncoder),
            vec!["", "_quantized", "_uint8", "_fp16"]
        );
    }

    #[test]
    fn smolvlm_names_and_files() {
        let f = Family::SmolVlm;
        assert_eq!(Family::from_model_type("idefics3"), Some(f));
        assert_eq!(Family::from_model_type("smolvlm"), Some(f));
        assert_eq!(f.default_quant(), Quant::Uint8);
        assert!(!f.quants().contains(&Quant::Q4Mixed));
        for q in [
            "FP32",
            "FP16",
            "INT8",
            "UINT8",
            "Q4",
            "Q4_F16",
            "BNB4",
            "QUANTIZED",
        ] {
            assert!(f.quants().contains(&Quant::parse(q).unwrap()), "{q}");
        }
        assert_eq!(
            f.candidate_suffixes(Quant::Bnb4, Component::VisionEncoder),
            vec!["_bnb4", "_uint8", "_quantized", "_int8", "_fp16", ""]
        );
        assert_eq!(
            f.preferred_suffix(Quant::Q4F16, Component::EmbedTokens),
            "_q4f16"
        );
        let e = by_display("smolvlm-256m-instruct").unwrap();
        assert_eq!(e.repo, "HuggingFaceTB/SmolVLM-256M-Instruct");
        assert_eq!(by_repo(e.repo).unwrap().family, f);
    }

    #[test]
    fn granite_vision_names_and_files() {
        let f = Family::GraniteVision;
        assert_eq!(Family::from_model_type("llava_next"), Some(f));
        assert_eq!(f.default_quant(), Quant::Q4Mixed);
        assert_eq!(
            f.candidate_suffixes(Quant::Q4, Component::EmbedTokens),
            vec!["_q4", "_quantized", "_int8", ""]
        );
        assert_eq!(
            f.candidate_suffixes(Quant::Int8, Component::DecoderModelMerged),
            vec!["_int8", "_quantized", ""]
        );
        assert_eq!(
            f.preferred_suffix(Quant::Q4Mixed, Component::VisionEncoder),
            "_quantized"
        );
        let e = by_display("granite-vision-3.2-2b").unwrap();
        assert_eq!(by_repo(e.repo).unwrap().family, f);
    }

    #[test]
    fn quant_names_round_trip() {
        for n in QUANT_NAMES {
            assert_eq!(Quant::parse(n).unwrap().name(), *n);
        }
        assert_eq!(Quant::parse("q4_mixed"), Some(Quant::Q4Mixed));
        assert_eq!(Quant::parse("nope"), None);
    }
}
