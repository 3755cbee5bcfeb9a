//! The Rust kernels against compositions of plain tch ops.

use super::*;
use tch::{Device, Kind, Tensor};

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    let scale = b.abs().max().double_value(&[]).max(1e-30);
    (a - b).abs().max().double_value(&[]) / scale
}

fn inputs(kind: Kind) -> (Tensor, Tensor, Tensor) {
    tch::manual_seed(7);
    let opts = (kind, Device::Cpu);
    let x = Tensor::randn([3, 50, 24], opts);
    let a = Tensor::randn([8, 24], opts) * 0.3;
    let b = Tensor::randn([16, 8], opts) * 0.3;
    (x, a, b)
}

/// The same formula with autograd over plain tch ops, the mask taken from `Dropout`.
fn reference(x: &Tensor, a: &Tensor, b: &Tensor, ew: &Elementwise, g: &Tensor) -> [Tensor; 4] {
    let x = x.detach().set_requires_grad(true);
    let a = a.detach().set_requires_grad(true);
    let b = b.detach().set_requires_grad(true);
    let h = x.matmul(&a.tr());
    let act = match ew.activation {
        Activation::Silu => h.silu(),
        Activation::Relu => h.relu(),
        Activation::Identity => h.shallow_clone(),
    };
    let m = match ew.dropout {
        Some(d) => {
            d.keep_tensor(h.numel() as i64, Device::Cpu)
                .unwrap()
                .reshape(h.size())
                .to_kind(h.kind())
                * d.keep_scale()
        }
        None => h.ones_like(),
    };
    let y = (act * m).matmul(&b.tr()) * ew.scaling;
    (&y * g).sum(y.kind()).backward();
    [y.detach(), x.grad(), a.grad(), b.grad()]
}

fn check(kind: Kind, activation: Activation, dropout: Option<Dropout>, tol: f64) {
    let (x, a, b) = inputs(kind);
    let ew = Elementwise {
        activation,
        scaling: 0.5,
        dropout,
    };
    let g = Tensor::randn([3, 50, 16], (kind, Device::Cpu));
    let (y, saved) = forward(&x, &a, &b, &ew).unwrap();
    let grads = backward(&g, &saved, Needs::ALL).unwrap();
    let [ry, rdx, rda, rdb] = reference(&x, &a, &b, &ew, &g);
    let label = format!("{kind:?} {activation:?} {dropout:?}");
    assert!(max_rel_diff(&y, &ry) < tol, "forward {label}");
    assert!(max_rel_diff(&grads.x.unwrap(), &rdx) < tol, "dx {label}");
    assert!(max_rel_diff(&grads.a.unwrap(), &rda) < tol, "dA {label}");
    assert!(max_rel_diff(&grads.b.unwrap(), &rdb) < tol, "dB {label}");
}

#[test]
fn forward_backward_match_tch_composition() {
    for activation in [Activation::Silu, Activation::Relu, Activation::Identity] {
        for dropout in [None, Some(Dropout { p: 0.3, seed: 11 })] {
            check(Kind::Double, activation, dropout, 1e-12);
            check(Kind::Float, activation, dropout, 1e-5);
        }
    }
}

#[test]
fn fused_passes_match_tensor_ops() {
    for kind in [Kind::Float, Kind::Double, Kind::BFloat16, Kind::Half] {
        for activation in [Activation::Silu, Activation::Relu, Activation::Identity] {
            let dropout = Some(Dropout { p: 0.2, seed: 3 });
            let ew = Elementwise {
                activation,
                scaling: 2.0,
                dropout,
            };
            // Large enough to take the parallel path.
            let h = Tensor::randn([1100, 70], (kind, Device::Cpu));
            let gb = Tensor::randn([1100, 70], (kind, Device::Cpu));
            let fused = elementwise::forward(&h, &ew).unwrap();
            let ops = elementwise::forward_tensor_ops(&h, &ew).unwrap();
            let (am, dz) = elementwise::backward(&h, &gb, &ew).unwrap();
            let (am_ops, dz_ops) = elementwise::backward_tensor_ops(&h, &gb, &ew).unwrap();
            let tol = if matches!(kind, Kind::Float | Kind::Double) {
                1e-6
            } else {
                1e-2
            };
            assert!(
                max_rel_diff(&fused, &ops) < tol,
                "{kind:?} {activation:?} forward"
            );
            assert!(
                max_rel_diff(&am, &am_ops) < tol,
                "{kind:?} {activation:?} am"
            );
            assert!(
                max_rel_diff(&dz, &dz_ops) < tol,
                "{kind:?} {activation:?} dz"
            );
            assert_eq!(fused.kind(), kind);
        }
    }
}

#[test]
fn dropout_zeroes_the_masked_fraction() {
    let h = Tensor::ones([400, 64], (Kind::Float, Device::Cpu));
    let ew = Elementwise {
        activation: Activation::Identity,
        scaling: 1.0,
        dropout: Some(Dropout { p: 0.25, seed: 5 }),
    };
    let out = elementwise::forward(&h, &ew).unwrap();
    let zeros = out
        .eq(0.0)
        .to_kind(Kind::Double)
        .mean(Kind::Double)
        .double_value(&[]);
    assert!((zeros - 0.25).abs() < 0.02, "dropped fraction {zeros}");
    let kept = out.max().double_value(&[]);
    assert!((kept - 1.0 / 0.75).abs() < 1e-6, "kept value {kept}");
}

#[test]
fn empty_batch_gives_empty_outputs() {
    let (_, a, b) = inputs(Kind::Float);
    let x = Tensor::zeros([0, 24], (Kind::Float, Device::Cpu));
    let ew = Elementwise {
        activation: Activation::Silu,
        scaling: 1.0,
        dropout: None,
    };
    let (y, saved) = forward(&x, &a, &b, &ew).unwrap();
    assert_eq!(y.size(), [0, 16]);
    let grads = backward(&y.zeros_like(), &saved, Needs::ALL).unwrap();
    assert_eq!(grads.x.unwrap().size(), [0, 24]);
    assert_eq!(grads.a.unwrap().double_value(&[0, 0]), 0.0);
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let (x, a, b) = inputs(Kind::Float);
    let ew = Elementwise {
        activation: Activation::Silu,
        scaling: 1.0,
        dropout: None,
    };
    let wrong_d_in = Tensor::zeros([4, 23], (Kind::Float, Device::Cpu));
    assert!(matches!(
        forward(&wrong_d_in, &a, &b, &ew),
        Err(crate::CeraError::Shape(_))
    ));
    let wrong_rank = Tensor::zeros([16, 7], (Kind::Float, Device::Cpu));
    assert!(matches!(
        forward(&x, &a, &wrong_rank, &ew),
        Err(crate::CeraError::Shape(_))
    ));
    let ints = Tensor::zeros([4, 24], (Kind::Int64, Device::Cpu));
    assert!(matches!(
        forward(&ints, &a, &b, &ew),
        Err(crate::CeraError::DType(_))
    ));
    let mixed = a.to_kind(Kind::Double);
    assert!(matches!(
        forward(&x, &mixed, &b, &ew),
        Err(crate::CeraError::DType(_))
    ));
    let bad_p = Elementwise {
        dropout: Some(Dropout { p: 1.0, seed: 0 }),
        ..ew
    };
    assert!(matches!(
        forward(&x, &a, &b, &bad_p),
        Err(crate::CeraError::Value(_))
    ));
    assert!(matches!(
        "gelu".parse::<Activation>(),
        Err(crate::CeraError::Value(_))
    ));
}
