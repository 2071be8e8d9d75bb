//! The LoRA key grammar: a key → dialect, component, module name and role.

/// Which naming family a LoRA key belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyDialect {
    /// `unet.<path>.lora_A.weight` (diffusers ≥ 0.26 / PEFT naming inside a pipeline file).
    Diffusers,
    /// `unet.<path>.lora.down.weight`, `text_encoder.<path>.lora_linear_layer.down.weight`.
    DiffusersLegacy,
    /// `base_model.model.<path>.lora_A[.<adapter>].weight`.
    PeftRaw,
    /// `lora_unet_<name>.lora_down.weight` / `.alpha` and LyCORIS tensors under kohya names.
    Kohya,
    /// `unet.<path>.processor.to_q_lora.down.weight`.
    AttnProcs,
}

/// The tensor a key holds within its module's adapter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Down,
    Up,
    Alpha,
    /// LoCon / LyCORIS Tucker core `lora_mid`.
    Mid,
    HadaW1A,
    HadaW1B,
    HadaW2A,
    HadaW2B,
    HadaT1,
    HadaT2,
    LokrW1,
    LokrW1A,
    LokrW1B,
    LokrW2,
    LokrW2A,
    LokrW2B,
    LokrT1,
    LokrT2,
    /// DoRA magnitude (`dora_scale`, `lora_magnitude_vector`).
    DoraScale,
    /// LyCORIS "full" weight difference `diff`.
    Diff,
    /// A bias difference (`diff_b`, PEFT `lora_B.bias`).
    BiasDiff,
    /// A tensor name we do not know (OFT, IA3, GLoRA, ...): kept verbatim.
    Other(String),
}

/// Which component a key's prefix names, before resolution.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Unet,
    TextEncoder,
    /// No component prefix (PEFT raw, `save_lora_adapter`, old `save_attn_procs`): inferred later.
    Unknown,
    /// SDXL's second text encoder or sgm UNet naming; the string says what gave it away.
    Sdxl(String),
    /// Some other model (`transformer.`, `lora_transformer_`, ...); the string is the prefix.
    Other(String),
}

/// A module reference as spelled in the file.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ModuleName {
    /// A dotted module path (text encoder paths as written, possibly with `text_model.`).
    Dotted(String),
    /// A kohya underscored name without its `lora_unet_` / `lora_te_` prefix.
    Underscored(String),
}

/// A parsed LoRA tensor key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraKey {
    pub dialect: KeyDialect,
    pub target: Target,
    pub module: ModuleName,
    pub role: Role,
    /// PEFT adapter name when the key carries one (`lora_A.default.weight`).
    pub adapter: Option<String>,
}

fn kohya_role(suffix: &str) -> Role {
    match suffix {
        "lora_down.weight" => Role::Down,
        "lora_up.weight" => Role::Up,
        "alpha" => Role::Alpha,
        "lora_mid.weight" => Role::Mid,
        "hada_w1_a" => Role::HadaW1A,
        "hada_w1_b" => Role::HadaW1B,
        "hada_w2_a" => Role::HadaW2A,
        "hada_w2_b" => Role::HadaW2B,
        "hada_t1" => Role::HadaT1,
        "hada_t2" => Role::HadaT2,
        "lokr_w1" => Role::LokrW1,
        "lokr_w1_a" => Role::LokrW1A,
        "lokr_w1_b" => Role::LokrW1B,
        "lokr_w2" => Role::LokrW2,
        "lokr_w2_a" => Role::LokrW2A,
        "lokr_w2_b" => Role::LokrW2B,
        "lokr_t1" => Role::LokrT1,
        "lokr_t2" => Role::LokrT2,
        "dora_scale" => Role::DoraScale,
        "diff" => Role::Diff,
        "diff_b" => Role::BiasDiff,
        other => Role::Other(other.to_string()),
    }
}

/// sgm / LDM UNet block names (kohya SDXL LoRAs); SD 1.x kohya LoRAs use diffusers names.
const SGM_UNET_MARKERS: [&str; 5] = [
    "input_blocks_",
    "output_blocks_",
    "middle_block_",
    "label_emb_",
    "add_embedding_",
];

/// Parse one key of a LoRA file. `None` when the key follows no known LoRA layout.
pub fn parse_lora_key(key: &str) -> Option<LoraKey> {
    // kohya / LyCORIS: `<name without dots>.<suffix>`, name starting with `lora_`.
    if let Some((name, suffix)) = key.split_once('.')
        && name.starts_with("lora_")
    {
        let role = kohya_role(suffix);
        let (target, rest) = if let Some(rest) = name.strip_prefix("lora_unet_") {
            let t = match SGM_UNET_MARKERS
                .iter()
                .find(|m| rest.starts_with(*m) || rest.contains(&format!("_{m}")))
            {
                Some(m) => Target::Sdxl(format!(
                    "sgm/LDM UNet naming `{}`, as kohya SDXL files use",
                    m.trim_end_matches('_')
                )),
                None => Target::Unet,
            };
            (t, rest)
        } else if let Some(rest) = name.strip_prefix("lora_te1_") {
            (Target::TextEncoder, rest)
        } else if let Some(rest) = name.strip_prefix("lora_te_") {
            (Target::TextEncoder, rest)
        } else if let Some(rest) = name.strip_prefix("lora_te2_") {
            (Target::Sdxl("second text encoder `lora_te2_`".into()), rest)
        } else {
            let prefix: String = name.splitn(3, '_').take(2).collect::<Vec<_>>().join("_");
            (Target::Other(prefix), name)
        };
        return Some(LoraKey {
            dialect: KeyDialect::Kohya,
            target,
            module: ModuleName::Underscored(rest.to_string()),
            role,
            adapter: None,
        });
    }

    let (body, role, mut dialect, adapter) = split_dotted_suffix(key)?;
    let (mut target, mut path) = split_component_prefix(body);
    if let Some(p) = body.strip_prefix("base_model.model.") {
        dialect = KeyDialect::PeftRaw;
        let (t, rest) = split_component_prefix(p);
        target = t;
        path = rest;
    }
    let mut path = path.to_string();
    // Old attn-procs: `<attn>.processor.to_q_lora` (or without `.processor`).
    if dialect == KeyDialect::AttnProcs {
        let (attn, proc_name) = path.rsplit_once('.')?;
        let attn = attn.strip_suffix(".processor").unwrap_or(attn);
        let te = match &target {
            Target::TextEncoder => true,
            Target::Unknown => attn.ends_with("self_attn"),
            _ => false,
        };
        let module = match (proc_name, te) {
            ("to_q_lora", false) => "to_q",
            ("to_k_lora", false) => "to_k",
            ("to_v_lora", false) => "to_v",
            ("to_out_lora", false) => "to_out.0",
            ("to_q_lora", true) => "q_proj",
            ("to_k_lora", true) => "k_proj",
            ("to_v_lora", true) => "v_proj",
            ("to_out_lora", true) => "out_proj",
            _ => return None,
        };
        path = format!("{attn}.{module}");
    } else if let Some(p) = path.strip_suffix(".processor") {
        path = p.to_string();
    }
    if path.is_empty() {
        return None;
    }
    if target == Target::Unet || target == Target::Unknown {
        for m in [
            "input_blocks.",
            "output_blocks.",
            "middle_block.",
            "label_emb.",
            "add_embedding.",
        ] {
            if path.starts_with(m) || path.contains(&format!(".{m}")) {
                target = Target::Sdxl(format!(
                    "sgm/LDM UNet naming `{}`, as kohya SDXL files use",
                    m.trim_end_matches('.')
                ));
            }
        }
    }
    Some(LoraKey {
        dialect,
        target,
        module: ModuleName::Dotted(path),
        role,
        adapter,
    })
}

/// `unet.` / `text_encoder.` / ... prefix of a dotted key body.
fn split_component_prefix(body: &str) -> (Target, &str) {
    if let Some(p) = body.strip_prefix("unet.") {
        (Target::Unet, p)
    } else if let Some(p) = body.strip_prefix("text_encoder_2.") {
        (
            Target::Sdxl("second text encoder `text_encoder_2.`".into()),
            p,
        )
    } else if let Some(p) = body.strip_prefix("text_encoder.") {
        (Target::TextEncoder, p)
    } else {
        for other in [
            "transformer.",
            "prior.",
            "decoder.",
            "controlnet.",
            "vae.",
            "model.diffusion_model.",
        ] {
            if let Some(p) = body.strip_prefix(other) {
                return (Target::Other(other.trim_end_matches('.').to_string()), p);
            }
        }
        (Target::Unknown, body)
    }
}

/// Split a dotted key into `(module part, role, dialect, adapter name)`.
fn split_dotted_suffix(key: &str) -> Option<(&str, Role, KeyDialect, Option<String>)> {
    const FIXED: [(&str, Role, KeyDialect); 6] = [
        (".lora.down.weight", Role::Down, KeyDialect::DiffusersLegacy),
        (".lora.up.weight", Role::Up, KeyDialect::DiffusersLegacy),
        (
            ".lora_linear_layer.down.weight",
            Role::Down,
            KeyDialect::DiffusersLegacy,
        ),
        (
            ".lora_linear_layer.up.weight",
            Role::Up,
            KeyDialect::DiffusersLegacy,
        ),
        (".lora_down.weight", Role::Down, KeyDialect::Diffusers),
        (".lora_up.weight", Role::Up, KeyDialect::Diffusers),
    ];
    for (suffix, role, dialect) in FIXED {
        if let Some(body) = key.strip_suffix(suffix) {
            return Some((body, role, dialect, None));
        }
    }
    for proc_name in ["to_q_lora", "to_k_lora", "to_v_lora", "to_out_lora"] {
        for (dir, role) in [("down", Role::Down), ("up", Role::Up)] {
            let suffix = format!(".{dir}.weight");
            if let Some(body) = key.strip_suffix(&suffix)
                && body.ends_with(&format!(".{proc_name}"))
            {
                return Some((body, role, KeyDialect::AttnProcs, None));
            }
        }
    }
    if let Some(body) = key.strip_suffix(".alpha") {
        return Some((body, Role::Alpha, KeyDialect::Diffusers, None));
    }
    // PEFT: `.lora_A.weight`, `.lora_A.<adapter>.weight`, `.lora_B.bias`, `.lora_magnitude_vector[.<adapter>][.weight]`.
    let segs: Vec<&str> = key.split('.').collect();
    let find = |name: &str| segs.iter().rposition(|s| *s == name);
    for (name, role) in [
        ("lora_A", Role::Down),
        ("lora_B", Role::Up),
        ("lora_magnitude_vector", Role::DoraScale),
    ] {
        let Some(i) = find(name) else { continue };
        if i == 0 {
            continue;
        }
        let tail = &segs[i + 1..];
        let (role, adapter) = match (tail, &role) {
            (["weight"], _) => (role, None),
            (["bias"], Role::Up) => (Role::BiasDiff, None),
            ([a, "weight"], _) => (role, Some(a.to_string())),
            ([a, "bias"], Role::Up) => (Role::BiasDiff, Some(a.to_string())),
            ([], Role::DoraScale) => (role, None),
            ([a], Role::DoraScale) => (role, Some(a.to_string())),
            _ => continue,
        };
        let body_len = segs[..i].iter().map(|s| s.len() + 1).sum::<usize>() - 1;
        return Some((&key[..body_len], role, KeyDialect::Diffusers, adapter));
    }
    None
}
