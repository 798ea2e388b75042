//! quiesce: a PID-1 supervisor for containers.
