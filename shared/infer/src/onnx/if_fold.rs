//! Folding ONNX `If` nodes whose condition is known before the data is.
//!
//! Exporters leave `If` nodes whose condition depends only on tensor shapes (squeeze an axis when
//! it has size 1) or on a configuration input (Silero VAD's sample rate). tract analyses *both*
//! branches of every `If`, so a branch that is impossible for the actual shapes (squeezing an
//! axis of size 4) fails the whole load, even though it would never run.
//!
//! Once input shapes (and configuration values) are fixed, such a condition is a constant. This
//! pass asks tract for it, on a copy of the graph cut down to the condition's ancestors, and
//! replaces the `If` with the branch taken. Conditions that depend on data are left alone.

use std::collections::{HashMap, HashSet};

use tract_core::internal::*;
use tract_onnx::pb::{AttributeProto, GraphProto, ModelProto, NodeProto, ValueInfoProto};
use tract_onnx::prelude::*;

/// Inlines every `If` whose condition is constant under `facts` (one per graph input).
/// Returns the rewritten model and how many `If` nodes were folded.
pub(crate) fn fold_constant_ifs(
    model: &ModelProto,
    facts: &[InferenceFact],
) -> TractResult<(ModelProto, usize)> {
    let mut model = model.clone();
    let mut folded = 0;
    // Each fold may expose nested Ifs as top-level nodes; go until no condition is constant.
    'search: loop {
        let graph = model.graph.as_ref().context("model has no graph")?;
        for (index, node) in graph.node.iter().enumerate() {
            if node.op_type != "If" || node.input.is_empty() {
                continue;
            }
            let Some(cond) = constant_condition(&model, &node.input[0], facts) else {
                continue;
            };
            let branch_name = if cond { "then_branch" } else { "else_branch" };
            let branch = node
                .attribute
                .iter()
                .find(|a| a.name == branch_name)
                .and_then(|a| a.g.clone())
                .with_context(|| format!("If node {:?} has no {branch_name}", node.name))?;
            tracing::debug!(node = %node.name, branch = branch_name, "folding If with a constant condition");
            let graph = model.graph.as_mut().context("model has no graph")?;
            inline_branch(graph, index, branch);
            folded += 1;
            continue 'search;
        }
        return Ok((model, folded));
    }
}

/// The value of `cond` if tract can compute it from shapes and constants alone.
fn constant_condition(model: &ModelProto, cond: &str, facts: &[InferenceFact]) -> Option<bool> {
    let sub = ancestors_model(model, cond)?;
    let value = crate::tract::guard("evaluating an If condition", || {
        let mut inference = onnx().model_for_proto_model(&sub)?;
        for (ix, fact) in facts.iter().enumerate() {
            inference.set_input_fact(ix, fact.clone())?;
        }
        let typed = inference.into_typed()?.into_decluttered()?;
        let outlet = typed.output_outlets()?[0];
        let konst = typed.outlet_fact(outlet)?.konst.clone();
        Ok(konst)
    })
    .ok()??;
    value.cast_to_scalar::<bool>().ok()
}

/// A copy of `model` whose graph computes only `output` (and what it needs).
fn ancestors_model(model: &ModelProto, output: &str) -> Option<ModelProto> {
    let graph = model.graph.as_ref()?;
    let producer: HashMap<&str, usize> = graph
        .node
        .iter()
        .enumerate()
        .flat_map(|(ix, n)| n.output.iter().map(move |o| (o.as_str(), ix)))
        .collect();
    let mut keep = HashSet::new();
    let mut needed: HashSet<String> = HashSet::new();
    let mut stack = vec![output.to_string()];
    while let Some(name) = stack.pop() {
        if !needed.insert(name.clone()) {
            continue;
        }
        if let Some(&ix) = producer.get(name.as_str())
            && keep.insert(ix)
        {
            stack.extend(node_inputs(&graph.node[ix]));
        }
    }
    let mut sub = model.clone();
    let g = sub.graph.as_mut()?;
    g.node = graph
        .node
        .iter()
        .enumerate()
        .filter(|(ix, _)| keep.contains(ix))
        .map(|(_, n)| n.clone())
        .collect();
    g.initializer.retain(|t| needed.contains(&t.name));
    g.output = vec![ValueInfoProto {
        name: output.to_string(),
        ..Default::default()
    }];
    g.value_info.clear();
    Some(sub)
}

/// Every value a node reads: its inputs, plus outer values its subgraphs capture.
fn node_inputs(node: &NodeProto) -> Vec<String> {
    let mut names: Vec<String> = node
        .input
        .iter()
        .filter(|i| !i.is_empty())
        .cloned()
        .collect();
    for attr in &node.attribute {
        if let Some(g) = &attr.g {
            names.extend(captured(g));
        }
        for g in &attr.graphs {
            names.extend(captured(g));
        }
    }
    names
}

/// Names a subgraph reads from enclosing scopes.
fn captured(graph: &GraphProto) -> Vec<String> {
    let mut defined: HashSet<&str> = graph.input.iter().map(|i| i.name.as_str()).collect();
    defined.extend(graph.initializer.iter().map(|t| t.name.as_str()));
    let mut out = Vec::new();
    for node in &graph.node {
        for name in node_inputs(node) {
            if !defined.contains(name.as_str()) {
                out.push(name);
            }
        }
        defined.extend(node.output.iter().map(String::as_str));
    }
    out
}

/// Replaces node `index` (an `If`) by the nodes of `branch`, wiring the branch outputs to the
/// `If` outputs through `Identity` nodes.
fn inline_branch(graph: &mut GraphProto, index: usize, branch: GraphProto) {
    let if_node = graph.node.remove(index);
    let prefix = if if_node.name.is_empty() {
        format!("if_{index}")
    } else {
        if_node.name.clone()
    };
    let mut nodes: Vec<NodeProto> = branch
        .node
        .into_iter()
        .enumerate()
        .map(|(i, mut n)| {
            // Node names must stay unique once the branch joins the main graph.
            n.name = format!(
                "{prefix}/{}",
                if n.name.is_empty() {
                    format!("{}_{i}", n.op_type)
                } else {
                    n.name
                }
            );
            n
        })
        .collect();
    for (i, (from, to)) in branch.output.iter().zip(&if_node.output).enumerate() {
        nodes.push(NodeProto {
            input: vec![from.name.clone()],
            output: vec![to.clone()],
            name: format!("{prefix}/output_{i}"),
            op_type: "Identity".into(),
            attribute: Vec::<AttributeProto>::new(),
            ..Default::default()
        });
    }
    graph.initializer.extend(branch.initializer);
    graph.node.splice(index..index, nodes);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
        NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            op_type: op.into(),
            name: outputs[0].into(),
            ..Default::default()
        }
    }

    #[test]
    fn captured_names_exclude_what_the_subgraph_defines() {
        let g = GraphProto {
            node: vec![
                node("Relu", &["outer_x"], &["a"]),
                node("Add", &["a", "outer_y"], &["b"]),
            ],
            ..Default::default()
        };
        assert_eq!(
            captured(&g),
            vec!["outer_x".to_string(), "outer_y".to_string()]
        );
    }

    #[test]
    fn inlining_splices_the_branch_and_renames_its_outputs() {
        let branch = GraphProto {
            node: vec![node("Relu", &["x"], &["r"])],
            output: vec![ValueInfoProto {
                name: "r".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut graph = GraphProto {
            node: vec![
                node("Neg", &["in"], &["x"]),
                node("If", &["c"], &["y"]),
                node("Abs", &["y"], &["z"]),
            ],
            ..Default::default()
        };
        inline_branch(&mut graph, 1, branch);
        let ops: Vec<&str> = graph.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["Neg", "Relu", "Identity", "Abs"]);
        assert_eq!(graph.node[2].input, ["r"]);
        assert_eq!(graph.node[2].output, ["y"]);
        assert_eq!(graph.node[1].name, "y/r");
    }
}
