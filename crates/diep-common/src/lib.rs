//! Small pieces every diep crate shares, with no dependencies (not even on a tensor framework),
//! so burn-free crates such as `diep-surgery` can use them too:
//!
//! - [`rng`]: [`SplitMix64`], the one seeded random generator of the toolkit (calibration
//!   sampling, the `random` baseline, epoch order, fixture generation), with its shuffle;
//! - [`hash`]: 64-bit FNV-1a ([`fnv1a64`], [`Fnv1a`]), for stable fingerprints and seeds;
//! - [`fs`]: atomic writes — a file through a temporary sibling and a rename, a directory
//!   through a [`Staging`] directory whose name records its owner, so a later run can
//!   recognise and remove what a killed run left behind;
//! - [`xml`]: escaping text for XML/SVG output.
#![warn(missing_docs)]

pub mod fs;
pub mod hash;
pub mod rng;
pub mod xml;

pub use fs::{Staging, StaleStaging, remove_stale_staging, write_atomic};
pub use hash::{Fnv1a, fnv1a64};
pub use rng::SplitMix64;
