//! quiesce control protocol v1.
