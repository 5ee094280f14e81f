//! The model families this build serves. A new family is its folder under `src/models/` (exporting
//! `SPEC`, see [`super::family::FamilySpec`]) and one line here.

use super::family::FamilySpec;

/// Every family, in the order `--help`, error messages and the catalog list them.
pub static FAMILIES: &[&FamilySpec] = &[
    &super::gemma3n::SPEC,
    &super::smolvlm::SPEC,
    &super::granite_vision::SPEC,
    &super::gemma4::SPEC,
];
