//! Projection (in progress).
