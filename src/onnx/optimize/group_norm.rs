//! GroupNorm (+ SiLU) → `com.microsoft.GroupNorm` (CUDA only: ONNX Runtime has no CPU kernel).
//!
//! torch exports `F.group_norm` as (torch/onnx/symbolic_opset9.py `group_norm`):
//!
//! ```text
//! x ─Reshape[0,G,-1]─InstanceNormalization(ones, zeros, ε)─Reshape(Shape(x))─Mul(γ[C,1,1])─Add(β[C,1,1])
//!                                                           [─Sigmoid─Mul: SiLU, diffusers' nonlinearity]
//! ```
//!
//! which becomes `Transpose(0,2,3,1) ─ GroupNorm(γ, β; groups G, ε, activation) ─ Transpose(0,3,1,2)`,
//! as onnxruntime/python/tools/transformers/fusion_group_norm.py does: the CUDA kernel takes
//! NHWC input only (`channels_last = 1`) and fp32 γ/β (contrib_ops/cuda/diffusion/group_norm.cc),
//! whatever the model's precision. With the CUDA provider's `prefer_nhwc` the convolutions around
//! run NHWC too and ONNX Runtime's transpose optimizer cancels the transposes pairwise.

use super::Report;
use super::graph::{Graph, attr_float, attr_int, attr_ints, contrib_node, onnx_node, scope};
use crate::onnx::proto::TensorProto;
use crate::onnx::proto::tensor_proto::DataType;

struct Match {
    x: String,
    groups: i64,
    eps: f32,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    silu: bool,
    /// The node whose output is the normalised (and activated) tensor.
    last: usize,
    out: String,
}

/// Fuse every group normalisation of the graph; `read` gives initializer values as f32.
pub(super) fn fuse(
    g: &mut Graph<'_>,
    read: &dyn Fn(&str) -> Option<Vec<f32>>,
    report: &mut Report,
) {
    let mut found = Vec::new();
    for i in 0..g.len() {
        if g.op(i) != Some("InstanceNormalization") {
            continue;
        }
        match find(g, i, read) {
            Ok(m) => found.push((i, m)),
            Err(why) => report.left_alone(g.node(i), "group norm", why),
        }
    }
    for (i, m) in found {
        let at = scope(g.node(i));
        let c = m.gamma.len() as i64;
        let gamma = g.fresh_name(&format!("{at}/GroupNorm.gamma"));
        let beta = g.fresh_name(&format!("{at}/GroupNorm.beta"));
        g.add_initializer(f32_initializer(&gamma, &m.gamma, c));
        g.add_initializer(f32_initializer(&beta, &m.beta, c));
        let nhwc = g.fresh_name(&format!("{at}/GroupNorm.nhwc_in"));
        let normed = g.fresh_name(&format!("{at}/GroupNorm.nhwc_out"));
        g.push(onnx_node(
            "Transpose",
            format!("{at}/GroupNorm.to_nhwc"),
            vec![m.x],
            vec![nhwc.clone()],
            vec![attr_ints("perm", &[0, 2, 3, 1])],
        ));
        g.push(contrib_node(
            "GroupNorm",
            format!("{at}/GroupNorm"),
            vec![nhwc, gamma, beta],
            vec![normed.clone()],
            vec![
                attr_float("epsilon", m.eps),
                attr_int("groups", m.groups),
                attr_int("activation", i64::from(m.silu)),
                attr_int("channels_last", 1),
            ],
        ));
        g.replace(
            m.last,
            onnx_node(
                "Transpose",
                format!("{at}/GroupNorm.to_nchw"),
                vec![normed],
                vec![m.out],
                vec![attr_ints("perm", &[0, 3, 1, 2])],
            ),
        );
        report.fused("GroupNorm");
    }
}

fn f32_initializer(name: &str, v: &[f32], c: i64) -> TensorProto {
    TensorProto {
        dims: vec![c],
        data_type: Some(DataType::Float as i32),
        name: Some(name.to_string()),
        raw_data: Some(bytemuck::cast_slice::<f32, u8>(v).to_vec().into()),
        ..Default::default()
    }
}

fn find(
    g: &Graph<'_>,
    inorm: usize,
    read: &dyn Fn(&str) -> Option<Vec<f32>>,
) -> Result<Match, &'static str> {
    let n = g.node(inorm);
    if n.input.len() != 3 {
        return Err("InstanceNormalization without scale and bias");
    }
    // Reshape(x, [0, G, -1]) in front.
    let r1 = g
        .producer_op(&n.input[0], "Reshape")
        .ok_or("InstanceNormalization input is not a Reshape")?;
    let shape = g
        .values(&g.node(r1).input[1])
        .ok_or("the group Reshape's shape is not constant")?;
    if shape.len() != 3 || shape[0] != 0.0 || shape[2] != -1.0 || shape[1] < 1.0 {
        return Err("the group Reshape is not [0, G, -1]");
    }
    let groups = shape[1];
    let x = g.node(r1).input[0].clone();
    // Unit scale and zero bias: a plain normalisation per group.
    let ones = g
        .values(&n.input[1])
        .ok_or("InstanceNormalization scale is not constant")?;
    let zeros = g
        .values(&n.input[2])
        .ok_or("InstanceNormalization bias is not constant")?;
    if ones.len() as f64 != groups
        || ones.iter().any(|&v| v != 1.0)
        || zeros.iter().any(|&v| v != 0.0)
    {
        return Err("InstanceNormalization scale/bias are not ones/zeros over G groups");
    }
    let eps = g.attr_float(inorm, "epsilon").unwrap_or(1e-5);
    // Reshape(·, Shape(x)) back.
    let in_out = &n.output[0];
    let r2 = g
        .only_consumer(in_out)
        .filter(|&r| g.op(r) == Some("Reshape"))
        .ok_or("InstanceNormalization output is not reshaped back")?;
    let back = g
        .producer_op(&g.node(r2).input[1], "Shape")
        .filter(|&s| g.node(s).input[0] == x && g.whole_shape(s))
        .ok_or("the reshape back does not use Shape(x)")?;
    let _ = back;
    // Mul(γ) and Add(β), each [C, 1, 1].
    let (mul, gamma_name) = affine_step(g, &g.node(r2).output[0], "Mul")
        .ok_or("no Mul by a per-channel γ after the normalisation")?;
    let (add, beta_name) =
        affine_step(g, &g.node(mul).output[0], "Add").ok_or("no Add of a per-channel β after γ")?;
    let gamma = g
        .float_values(&gamma_name, read)
        .ok_or("γ cannot be read")?;
    let beta = g.float_values(&beta_name, read).ok_or("β cannot be read")?;
    let c = gamma.len();
    if beta.len() != c || c == 0 {
        return Err("γ and β differ in length");
    }
    let gi = groups as usize;
    if c % gi != 0 || !(c / gi).is_multiple_of(2) {
        // group_norm_impl.cu: channels per group must divide C and be even
        return Err("channels per group odd or not dividing C (the CUDA kernel refuses it)");
    }
    if gamma.iter().chain(&beta).any(|v| !v.is_finite()) {
        return Err("γ or β is not finite");
    }
    // SiLU: Sigmoid(y) and Mul(y, sigmoid) as the only readers of y.
    let y = &g.node(add).output[0];
    let readers = g.consumers(y);
    let silu = match readers.as_slice() {
        [a, b] if !g.is_graph_output(y) => {
            let (sig, m) = if g.op(*a) == Some("Sigmoid") {
                (*a, *b)
            } else {
                (*b, *a)
            };
            (g.op(sig) == Some("Sigmoid")
                && g.op(m) == Some("Mul")
                && g.only_consumer(&g.node(sig).output[0]) == Some(m)
                && g.node(m).input.iter().any(|i| i == y))
            .then_some(m)
        }
        _ => None,
    };
    let (last, silu) = match silu {
        Some(m) => (m, true),
        None => (add, false),
    };
    Ok(Match {
        x,
        groups: groups as i64,
        eps,
        gamma,
        beta,
        silu,
        last,
        out: g.node(last).output[0].clone(),
    })
}

/// The one reader of `x` when it is `op`(x, p) with p a constant of dims [C, 1, 1]: (node, p).
fn affine_step(g: &Graph<'_>, x: &str, op: &str) -> Option<(usize, String)> {
    let m = g.only_consumer(x).filter(|&m| g.op(m) == Some(op))?;
    let p = g.other_input(m, x)?;
    let dims = g.const_dims(&p)?;
    (dims.len() == 3 && dims[1] == 1 && dims[2] == 1 && dims[0] >= 1).then_some((m, p))
}
