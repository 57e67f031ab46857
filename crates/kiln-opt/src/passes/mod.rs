//! One module per pass. Each exposes `run(&mut Graph, &PassCtx) -> usize`
//! (the number of rewrites) and leaves the graph unchanged where it cannot
//! prove a rewrite safe.

pub mod activation;
pub mod attention;
pub mod bn_fold;
pub mod channels_last;
pub mod const_fold;
pub mod cse;
pub mod dce;
pub mod fusion;
pub mod identity;
pub mod norm;
pub mod pw_dw;
