//! The minijinja environment every row template (prompt, completion, chat turns) is checked and
//! rendered with, and the variables a template reads. Validation and the template stage both use
//! it, so a template that validates renders under the same rules.
//!
//! Rules (documented for users in the template stage): undefined variables are errors (strict),
//! printing a null cell is an error (`{% if x %}` still works on nulls), no autoescaping, one
//! trailing newline of a template is dropped (as in Jinja2), Python string methods (`.strip()`,
//! `.upper()`, …) work through minijinja-contrib's pycompat, and `{% include %}` / `{% import %}`
//! resolve relative to the pipeline directory. Rows themselves (Arrow record batches) are the main
//! crate's `data::render`. Never prints.

use std::collections::BTreeSet;
use std::path::Path;

use minijinja::{Environment, Error, ErrorKind, UndefinedBehavior};

/// Names minijinja provides itself (not columns): excluded from "unknown variable" checks.
pub const BUILTIN_NAMES: &[&str] = &[
    "range",
    "dict",
    "namespace",
    "debug",
    "loop",
    "self",
    "caller",
    "varargs",
    "kwargs",
    "true",
    "false",
    "none",
    "True",
    "False",
    "None",
];

/// The environment for row templates (prompt, completion, chat turns).
pub fn row_environment(project_dir: &Path) -> Environment<'static> {
    let mut env = Environment::new();
    // minijinja keeps template sources and error spans only in debug mode, which defaults to
    // `cfg!(debug_assertions)`: without this, a release build's errors lose the expression that
    // failed (`undefined variable` instead of ``undefined variable `txet` ``).
    env.set_debug(true);
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_loader(minijinja::path_loader(project_dir));
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    env.set_formatter(|out, state, value| {
        if value.is_none() {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "the value is null (test it with `{% if … %}` or use `| default(…)`)",
            ));
        }
        minijinja::escape_formatter(out, state, value)
    });
    env
}

/// The top-level variables a template reads that neither it nor minijinja defines.
pub fn undeclared_variables(env: &Environment<'_>, name: &str) -> Result<BTreeSet<String>, Error> {
    let template = env.get_template(name)?;
    Ok(template
        .undeclared_variables(false)
        .into_iter()
        .filter(|v| !BUILTIN_NAMES.contains(&v.as_str()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Release builds too: the error must still carry the failing expression's span.
    #[test]
    fn errors_keep_the_failing_expression_in_every_build_profile() {
        let mut env = row_environment(Path::new("."));
        env.add_template("row", "{{ txet }}").unwrap();
        let error = env
            .get_template("row")
            .unwrap()
            .render(minijinja::context! {})
            .unwrap_err();
        let (Some(source), Some(range)) = (error.template_source(), error.range()) else {
            panic!("no span in {error}")
        };
        assert_eq!(source.get(range).map(str::trim), Some("txet"));
    }
}
