//! nix (to be written).
