//! The branch's activation and its derivative (the paper's SiLU and its ablations).

use crate::error::{CeraError, Result};
use std::str::FromStr;
use tch::Tensor;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Silu,
    Relu,
    Identity,
}

impl FromStr for Activation {
    type Err = CeraError;

    fn from_str(name: &str) -> Result<Self> {
        match name {
            "silu" => Ok(Self::Silu),
            "relu" => Ok(Self::Relu),
            "identity" => Ok(Self::Identity),
            other => Err(CeraError::Value(format!(
                "unknown activation {other:?}: expected one of \"silu\", \"relu\", \"identity\""
            ))),
        }
    }
}

impl Activation {
    /// act(h) with tensor ops, for the tensor-op path (other devices).
    pub fn apply_tensor(self, h: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Silu => h.f_silu()?,
            Self::Relu => h.f_relu()?,
            Self::Identity => h.shallow_clone(),
        })
    }

    /// `grad * act'(h)` with one fused op (torch's own activation backward).
    pub fn backward_tensor(self, grad: &Tensor, h: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Silu => h.f_silu_backward(grad)?,
            Self::Relu => h.f_threshold_backward(grad, 0.0)?,
            Self::Identity => grad.shallow_clone(),
        })
    }
}
