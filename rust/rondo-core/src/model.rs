//! What a model *is* to Rondo: an ordered list of named tensors, each with a dtype and a shape.
//!
//! The wire format (safetensors) is parsed at the edge; this module only knows the shapes that
//! every update of a round must agree on.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Element types that Rondo can aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    F32,
    F64,
    F16,
    BF16,
}

impl DType {
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The name safetensors uses for this dtype.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F64 => "F64",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.safetensors_name())
    }
}

/// One tensor of a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn element_count(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn byte_len(&self) -> usize {
        self.element_count() * self.dtype.size_bytes()
    }
}

/// The tensors of a model in the order their bytes are laid out.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ModelSpec {
    pub tensors: Vec<TensorSpec>,
}

/// Why an update does not fit the global model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelMismatch {
    #[error("tensor `{0}` is missing from the update")]
    MissingTensor(String),
    #[error("tensor `{0}` is not part of the global model")]
    UnexpectedTensor(String),
    #[error("tensor `{name}` has dtype {got}, the global model has {expected}")]
    DType {
        name: String,
        expected: DType,
        got: DType,
    },
    #[error("tensor `{name}` has shape {got:?}, the global model has {expected:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
}

impl ModelSpec {
    pub fn byte_len(&self) -> usize {
        self.tensors.iter().map(TensorSpec::byte_len).sum()
    }

    pub fn element_count(&self) -> usize {
        self.tensors.iter().map(TensorSpec::element_count).sum()
    }

    /// Checks that `update` has exactly this model's tensors (same names, dtypes and shapes).
    /// The byte order of the tensors may differ; [`ModelSpec::matches`] only compares by name.
    pub fn check_update(&self, update: &ModelSpec) -> Result<(), ModelMismatch> {
        for expected in &self.tensors {
            let Some(got) = update.tensors.iter().find(|t| t.name == expected.name) else {
                return Err(ModelMismatch::MissingTensor(expected.name.clone()));
            };
            if got.dtype != expected.dtype {
                return Err(ModelMismatch::DType {
                    name: expected.name.clone(),
                    expected: expected.dtype,
                    got: got.dtype,
                });
            }
            if got.shape != expected.shape {
                return Err(ModelMismatch::Shape {
                    name: expected.name.clone(),
                    expected: expected.shape.clone(),
                    got: got.shape.clone(),
                });
            }
        }
        if let Some(extra) = update
            .tensors
            .iter()
            .find(|t| !self.tensors.iter().any(|e| e.name == t.name))
        {
            return Err(ModelMismatch::UnexpectedTensor(extra.name.clone()));
        }
        Ok(())
    }
}

/// A spec from `(name, dtype, shape)` triples, for the crate's tests.
#[cfg(test)]
pub(crate) fn spec_of(tensors: &[(&str, DType, &[usize])]) -> ModelSpec {
    ModelSpec {
        tensors: tensors
            .iter()
            .map(|(name, dtype, shape)| TensorSpec {
                name: name.to_string(),
                dtype: *dtype,
                shape: shape.to_vec(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(tensors: &[(&str, DType, &[usize])]) -> ModelSpec {
        spec_of(tensors)
    }

    #[test]
    fn sizes_add_up() {
        let m = spec(&[("a", DType::F32, &[2, 3]), ("b", DType::BF16, &[5])]);
        assert_eq!(m.element_count(), 11);
        assert_eq!(m.byte_len(), 24 + 10);
    }

    #[test]
    fn update_check_names_each_kind_of_mismatch() {
        let global = spec(&[("a", DType::F32, &[2]), ("b", DType::F32, &[3])]);
        let reordered = spec(&[("b", DType::F32, &[3]), ("a", DType::F32, &[2])]);
        assert_eq!(global.check_update(&reordered), Ok(()));
        assert_eq!(
            global.check_update(&spec(&[("a", DType::F32, &[2])])),
            Err(ModelMismatch::MissingTensor("b".into()))
        );
        let extra = spec(&[
            ("a", DType::F32, &[2]),
            ("b", DType::F32, &[3]),
            ("c", DType::F32, &[1]),
        ]);
        assert_eq!(
            global.check_update(&extra),
            Err(ModelMismatch::UnexpectedTensor("c".into()))
        );
        let wrong_dtype = spec(&[("a", DType::F64, &[2]), ("b", DType::F32, &[3])]);
        assert!(matches!(
            global.check_update(&wrong_dtype),
            Err(ModelMismatch::DType { .. })
        ));
        let wrong_shape = spec(&[("a", DType::F32, &[1, 2]), ("b", DType::F32, &[3])]);
        assert!(matches!(
            global.check_update(&wrong_shape),
            Err(ModelMismatch::Shape { .. })
        ));
    }
}
