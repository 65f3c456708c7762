//! `peftpipe schema`: print the JSON Schema of pipeline files on stdout
//! (`peftpipe schema > schemas/pipeline.schema.json`).

use clap::Args;

use super::GlobalArgs;

#[derive(Debug, Args)]
pub struct SchemaArgs {}

pub fn run(_global: &GlobalArgs, _args: SchemaArgs) -> u8 {
    crate::report::problems::print_data(&crate::schema::pipeline_schema_json());
    super::EXIT_OK
}
