//! The guide, one page per task: the files under `docs/` in the repository,
//! included here so that they read as part of these docs and so that every
//! Rust block in them is compiled as a doc test.
//!
//! Start with [`handlers`]; the pages link to each other by file name.

#[doc = include_str!("../docs/handlers.md")]
pub mod handlers {}

#[doc = include_str!("../docs/jobs.md")]
pub mod jobs {}

#[doc = include_str!("../docs/replicas.md")]
pub mod replicas {}

#[doc = include_str!("../docs/rollout.md")]
pub mod rollout {}

#[doc = include_str!("../docs/moves.md")]
pub mod moves {}

#[doc = include_str!("../docs/moves-model.md")]
pub mod moves_model {}

#[doc = include_str!("../docs/migrations.md")]
pub mod migrations {}

#[doc = include_str!("../docs/hot-tenants.md")]
pub mod hot_tenants {}

#[doc = include_str!("../docs/security.md")]
pub mod security {}

#[doc = include_str!("../docs/reference.md")]
pub mod reference {}

#[doc = include_str!("../docs/benchmarks.md")]
pub mod benchmarks {}

// Its fixture example needs the `testing` feature.
#[cfg_attr(feature = "testing", doc = include_str!("../docs/testing.md"))]
#[cfg_attr(
    not(feature = "testing"),
    doc = "Tests: `docs/testing.md` (built with the `testing` feature)."
)]
pub mod testing {}

// The README's handler is compiled too.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
mod readme {}
