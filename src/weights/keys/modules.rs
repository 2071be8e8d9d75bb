//! The modules a model has, per component: what kohya names are resolved against.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use super::WeightFile;
use super::*;
use crate::Result;

/// The modules that exist in a model, per component, as canonical paths. kohya names are
/// resolved against it, and dotted names are checked against it.
pub trait ModuleSet {
    /// Whether `path` (canonical) is a module of `component`.
    fn contains(&self, component: Component, path: &str) -> bool;
    /// Every canonical module path of `component`.
    fn paths(&self, component: Component) -> Vec<String>;
    /// The torch-layout shape of the module's `weight` (`[out, in]` or `[out, in, kh, kw]`) when
    /// known. LoRA readers then refuse adapters whose ΔW does not fit.
    fn weight_shape(&self, _component: Component, _path: &str) -> Option<Vec<usize>> {
        None
    }
}

/// A [`ModuleSet`] held in memory (with weight shapes when built from weight files).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModuleList {
    unet: BTreeSet<String>,
    text_encoder: BTreeSet<String>,
    shapes: HashMap<(Component, String), Vec<usize>>,
}

impl ModuleList {
    pub fn new() -> Self {
        Self::default()
    }

    fn set(&self, component: Component) -> &BTreeSet<String> {
        match component {
            Component::Unet => &self.unet,
            Component::TextEncoder => &self.text_encoder,
        }
    }

    /// Add a module (canonicalised: a text encoder path loses `text_model.`).
    pub fn insert(&mut self, component: Component, path: &str) {
        let path = canonical_path(component, path).to_string();
        match component {
            Component::Unet => self.unet.insert(path),
            Component::TextEncoder => self.text_encoder.insert(path),
        };
    }

    /// Add a module with the torch-layout shape of its `weight`.
    pub fn insert_with_shape(&mut self, component: Component, path: &str, shape: Vec<usize>) {
        self.insert(component, path);
        self.shapes.insert(
            (component, canonical_path(component, path).to_string()),
            shape,
        );
    }

    /// Add the module of every parameter key (`<path>.weight`, `<path>.bias`, ...).
    pub fn extend_from_weight_keys<'a>(
        &mut self,
        component: Component,
        keys: impl IntoIterator<Item = &'a str>,
    ) {
        for key in keys {
            if let Some((path, _)) = module_of_weight_key(component, key) {
                self.insert(component, &path);
            }
        }
    }

    /// Add the modules of a diffusers-layout weight file (keys `<module>.<param>`), with the
    /// shapes of their `weight` tensors.
    pub fn extend_from_weight_file(&mut self, component: Component, file: &WeightFile) {
        for (key, info) in file.tensors() {
            if let Some((path, param)) = module_of_weight_key(component, key) {
                if param == "weight" {
                    self.insert_with_shape(component, &path, info.shape.clone());
                } else {
                    self.insert(component, &path);
                }
            }
        }
    }

    /// Modules of a diffusers-layout weight file (keys `<module>.<param>`), with weight shapes.
    pub fn from_weight_file(component: Component, file: &WeightFile) -> Self {
        let mut list = Self::new();
        list.extend_from_weight_file(component, file);
        list
    }

    /// Modules of a diffusers pipeline folder: `unet/diffusion_pytorch_model.safetensors` and
    /// `text_encoder/model.safetensors` (whichever exist; at least one must).
    pub fn from_diffusers_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let mut list = Self::new();
        let mut found = false;
        for (component, rel) in [
            (Component::Unet, "unet/diffusion_pytorch_model.safetensors"),
            (Component::TextEncoder, "text_encoder/model.safetensors"),
        ] {
            let p = dir.join(rel);
            if p.exists() {
                let f = WeightFile::open(&p)?;
                list.extend_from_weight_file(component, &f);
                found = true;
            }
        }
        if !found {
            return Err(crate::Error::InvalidArgument(format!(
                "{}: no unet/diffusion_pytorch_model.safetensors or text_encoder/model.safetensors",
                dir.display()
            )));
        }
        Ok(list)
    }

    pub fn len(&self, component: Component) -> usize {
        self.set(component).len()
    }

    pub fn is_empty(&self) -> bool {
        self.unet.is_empty() && self.text_encoder.is_empty()
    }

    pub fn iter(&self, component: Component) -> impl Iterator<Item = &str> + '_ {
        self.set(component).iter().map(String::as_str)
    }
}

impl ModuleSet for ModuleList {
    fn contains(&self, component: Component, path: &str) -> bool {
        self.set(component)
            .contains(canonical_path(component, path))
    }

    fn paths(&self, component: Component) -> Vec<String> {
        self.set(component).iter().cloned().collect()
    }

    fn weight_shape(&self, component: Component, path: &str) -> Option<Vec<usize>> {
        self.shapes
            .get(&(component, canonical_path(component, path).to_string()))
            .cloned()
    }
}
