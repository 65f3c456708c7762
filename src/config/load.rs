//! Parse a pipeline file: YAML with spans, `--set` overrides, every problem collected with its
//! file:line:column and key path, then semantic checks into a [`super::Pipeline`].
