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
    /// act(h) with tensor ops, for devices the Rust loops do not touch.
    pub fn apply_tensor(self, h: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Silu => h.f_silu()?,
            Self::Relu => h.f_relu()?,
            Self::Identity => h.shallow_clone(),
        })
    }

    /// act'(h) with tensor ops.
    pub fn slope_tensor(self, h: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Silu => {
                let sig = h.f_sigmoid()?;
                let one_minus = sig.f_neg()?.f_add_scalar(1.0)?;
                sig.f_mul(&h.f_mul(&one_minus)?.f_add_scalar(1.0)?)?
            }
            Self::Relu => h.f_gt(0.0)?.f_to_kind(h.f_kind()?)?,
            Self::Identity => h.f_ones_like()?,
        })
    }
}
