//! Shape and type inference (filled in below).
