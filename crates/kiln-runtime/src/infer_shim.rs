// TEMPORARY until kiln_ir::infer lands.
pub struct InferReport {
    pub warnings: Vec<String>,
}
pub fn infer_graph(
    _g: &mut kiln_ir::Graph,
    _o: &std::collections::HashMap<String, kiln_ir::ValueType>,
) -> Result<InferReport, kiln_ir::IrError> {
    Ok(InferReport { warnings: vec![] })
}
