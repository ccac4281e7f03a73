//! Inputs of the generate stage: problem sets ([`dataset`]) and prompt templates ([`prompt`]).

pub mod dataset;
pub mod prompt;
