//! The streamed regression against dense float64 solutions of the same problems.

use super::*;
use crate::error::CeraError;
use crate::test_rng::Rng;
use tch::{Device, Kind, Tensor};

const F64: (Kind, Device) = (Kind::Double, Device::Cpu);
const NO_RIDGE: Solve = Solve {
    ridge: 0.0,
    bias: false,
};

fn max_abs(t: &Tensor) -> f64 {
    t.abs().max().double_value(&[])
}

fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    max_abs(&(a - b)) / max_abs(b).max(1e-300)
}

fn fitted(x: &Tensor, y: &Tensor) -> Moments {
    let mut m = Moments::new(x.size()[1], y.size()[1], Device::Cpu).unwrap();
    m.update(x, y).unwrap();
    m
}

/// `x` (n, d_in) Gaussian with unequal feature scales, `y = B silu(A x)` with r = 6.
fn silu_data(rng: &mut Rng, n: i64, d_in: i64, d_out: i64) -> (Tensor, Tensor) {
    let scales = Tensor::linspace(0.3, 2.0, d_in, F64);
    let x = rng.randn(&[n, d_in], F64) * scales;
    let a = rng.randn(&[6, d_in], F64) / (d_in as f64).sqrt();
    let b = rng.randn(&[d_out, 6], F64);
    let y = x.mm(&a.tr()).silu().mm(&b.tr());
    (x, y)
}

/// The tensors of a moments state, in one order.
fn parts(s: &MomentsState) -> [&Tensor; 5] {
    [&s.xx, &s.yx, &s.sum_x, &s.sum_y, &s.sum_yy]
}

/// `sum ||y - x W^T - b||^2 / sum ||y||^2`.
fn unexplained(x: &Tensor, y: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> f64 {
    let mut fit = x.mm(&w.tr());
    if let Some(b) = bias {
        fit += b;
    }
    (y - fit).square().sum(Kind::Double).double_value(&[])
        / y.square().sum(Kind::Double).double_value(&[])
}

#[test]
fn identity_branch_is_reproduced_exactly_at_its_rank() {
    let mut rng = Rng::new(1);
    let (d_in, d_out, r) = (24, 18, 5);
    let a = rng.randn(&[r, d_in], F64);
    let b = rng.randn(&[d_out, r], F64);
    let x = rng.randn(&[200, d_in], F64);
    let fit = fitted(&x, &x.mm(&a.tr()).mm(&b.tr()))
        .solve(NO_RIDGE)
        .unwrap();
    let ba = b.mm(&a);
    assert!(rel_diff(fit.weight(), &ba) < 1e-10);
    let lin = fit.linearity();
    assert_eq!(lin.len(), 19);
    assert_eq!(lin[0], 0.0);
    assert!(lin[r as usize - 1] < 0.999);
    for l in &lin[r as usize..] {
        assert!((l - 1.0).abs() < 1e-10, "{l}");
    }
    let (fb, fa, bias) = fit.factors(r as usize).unwrap();
    assert_eq!((fb.size(), fa.size()), (vec![d_out, r], vec![r, d_in]));
    assert!(bias.is_none());
    assert!(rel_diff(&fb.mm(&fa), &ba) < 1e-10);
    // Balanced: B^T B = A A^T (both diag of W_k's singular values).
    assert!(rel_diff(&fb.tr().mm(&fb), &fa.mm(&fa.tr())) < 1e-10);
}

#[test]
fn full_rank_equals_dense_least_squares() {
    let mut rng = Rng::new(2);
    let (x, y) = silu_data(&mut rng, 300, 16, 12);
    let fit = fitted(&x, &y).solve(NO_RIDGE).unwrap();
    let (solution, _, _, _) = Tensor::linalg_lstsq(&x, &y, None, "gelsd");
    assert!(rel_diff(fit.weight(), &solution.tr()) < 1e-10);
    let full = *fit.linearity().last().unwrap();
    let direct = 1.0 - unexplained(&x, &y, &solution.tr(), None);
    assert!((full - direct).abs() < 1e-10, "{full} vs {direct}");
    assert!(full < 0.999, "SiLU leaves a non-linear remainder: {full}");
}

#[test]
fn every_rank_is_the_reduced_rank_optimum() {
    let mut rng = Rng::new(3);
    let (x, y) = silu_data(&mut rng, 400, 20, 14);
    let fit = fitted(&x, &y).solve(NO_RIDGE).unwrap();
    let w = fit.weight();
    // Dense reduced-rank regression: project W* onto the top right singular vectors
    // of the fitted outputs X W*^T.
    let (_, _, v) = x.mm(&w.tr()).svd(true, true);
    let (u_w, s_w, v_w) = w.svd(true, true);
    let lin = fit.linearity();
    for k in 1..=6_i64 {
        let (b, a, _) = fit.factors(k as usize).unwrap();
        let wk = b.mm(&a);
        let vk = v.narrow(1, 0, k);
        let optimum = vk.mm(&vk.tr()).mm(w);
        assert!(rel_diff(&wk, &optimum) < 1e-8, "k={k}");
        let err = unexplained(&x, &y, &wk, None);
        assert!((1.0 - lin[k as usize] - err).abs() < 1e-10, "k={k}");
        let truncated = (u_w.narrow(1, 0, k) * s_w.narrow(0, 0, k)).mm(&v_w.narrow(1, 0, k).tr());
        assert!(
            err <= unexplained(&x, &y, &truncated, None) + 1e-12,
            "k={k}"
        );
        assert!(
            lin[k as usize] >= lin[k as usize - 1] - 1e-12,
            "monotone at k={k}"
        );
    }
    // Beyond the branch's rank (6) the fitted outputs have no energy left.
    let spectrum = fit.fitted_spectrum().unwrap();
    assert!(spectrum.tail_energy(6) < 1e-12);
}

#[test]
fn bias_fits_the_affine_optimum() {
    let mut rng = Rng::new(4);
    let (x, y) = silu_data(&mut rng, 300, 10, 8);
    let x = x + 0.7;
    let y = y + rng.randn(&[8], F64);
    let fit = fitted(&x, &y)
        .solve(Solve {
            ridge: 0.0,
            bias: true,
        })
        .unwrap();
    let ones = Tensor::ones([300, 1], F64);
    let (solution, _, _, _) =
        Tensor::linalg_lstsq(&Tensor::cat(&[&x, &ones], 1), &y, None, "gelsd");
    let (w, b) = (solution.narrow(0, 0, 10).tr(), solution.get(10));
    assert!(rel_diff(fit.weight(), &w) < 1e-9);
    let (fb, fa, bias) = fit.factors(8).unwrap();
    assert!(rel_diff(bias.as_ref().unwrap(), &b) < 1e-9);
    let err = unexplained(&x, &y, &fb.mm(&fa), bias.as_ref());
    assert!((1.0 - fit.linearity()[8] - err).abs() < 1e-10);
    // Rank 0 with bias: the mean alone.
    let mean = y.mean_dim(0, false, Kind::Double);
    let zero = Tensor::zeros([8, 10], F64);
    assert!((1.0 - fit.linearity()[0] - unexplained(&x, &y, &zero, Some(&mean))).abs() < 1e-10);
}

#[test]
fn ridge_and_rank_deficient_inputs() {
    let mut rng = Rng::new(5);
    // x spans 4 of its 9 features: the pseudo-inverse gives the minimum-norm solution.
    let x = rng.randn(&[100, 4], F64).mm(&rng.randn(&[4, 9], F64));
    let y = x.mm(&rng.randn(&[9, 7], F64)).silu();
    let fit = fitted(&x, &y).solve(NO_RIDGE).unwrap();
    let min_norm = x.linalg_pinv(1e-10, false).mm(&y).tr();
    assert!(rel_diff(fit.weight(), &min_norm) < 1e-7);

    let ridge = 0.1;
    let fit = fitted(&x, &y).solve(Solve { ridge, bias: false }).unwrap();
    let cxx = x.tr().mm(&x) / 100.0;
    let shift = ridge * cxx.trace().double_value(&[]) / 9.0;
    let expected = Tensor::linalg_solve(
        &(cxx + Tensor::eye(9, F64) * shift),
        &(x.tr().mm(&y) / 100.0),
        true,
    )
    .tr();
    assert!(rel_diff(fit.weight(), &expected) < 1e-10);
    let err = unexplained(&x, &y, fit.weight(), None);
    assert!((1.0 - fit.linearity()[7] - err).abs() < 1e-10);
}

#[test]
fn any_split_and_order_and_merge_give_one_state() {
    let mut rng = Rng::new(6);
    let (x, y) = silu_data(&mut rng, 120, 700, 3);
    let whole = fitted(&x, &y).state().unwrap();
    let perm = rng.randperm(120);
    let (xp, yp) = (x.index_select(0, &perm), y.index_select(0, &perm));
    let mut first = Moments::new(700, 3, Device::Cpu).unwrap();
    let mut second = Moments::new(700, 3, Device::Cpu).unwrap();
    first
        .update(&xp.narrow(0, 0, 7), &yp.narrow(0, 0, 7))
        .unwrap();
    second
        .update(
            &xp.narrow(0, 7, 113).view([113, 1, 700]),
            &yp.narrow(0, 7, 113).view([113, 1, 3]),
        )
        .unwrap();
    first.merge(&second).unwrap();
    let merged = first.state().unwrap();
    assert_eq!(merged.tokens, 120);
    for (a, b) in parts(&merged).into_iter().zip(parts(&whole)) {
        assert!(rel_diff(a, b) < 1e-12);
    }
    // 700 input features: two panels of the Gram routine, the second ragged.
    let dense = x.tr().mm(&x);
    assert!(rel_diff(&whole.xx, &dense) < 1e-12);

    // A reload is what was saved, bit for bit (the merged moments differ from the
    // whole ones by summation order, up to ~1e-12: compared above, not here).
    let loaded = Moments::from_state(&merged).unwrap();
    assert_eq!(loaded.tokens(), 120);
    let reloaded = loaded.state().unwrap();
    for (a, b) in parts(&reloaded).into_iter().zip(parts(&merged)) {
        assert!(a.equal(b));
    }
    assert!(matches!(
        Moments::new(700, 4, Device::Cpu).unwrap().merge(&loaded),
        Err(CeraError::Shape(_))
    ));
}

#[test]
fn state_size_does_not_grow_with_tokens() {
    let mut rng = Rng::new(7);
    let mut m = Moments::new(8, 5, Device::Cpu).unwrap();
    let numel = |m: &Moments| {
        let s = m.state().unwrap();
        parts(&s).iter().map(|t| t.numel()).sum::<usize>()
    };
    let before = numel(&m);
    for _ in 0..5 {
        m.update(&rng.randn(&[1000, 8], F64), &rng.randn(&[1000, 5], F64))
            .unwrap();
    }
    assert_eq!(m.tokens(), 5000);
    assert_eq!(numel(&m), before);
    assert_eq!(before, 64 + 40 + 8 + 5 + 1);
}

#[test]
fn bad_inputs_are_errors_and_leave_the_state_alone() {
    let mut rng = Rng::new(8);
    let mut m = Moments::new(4, 3, Device::Cpu).unwrap();
    assert!(matches!(m.solve(NO_RIDGE), Err(CeraError::Value(_))));
    let x = Tensor::ones([5, 4], F64);
    let y = Tensor::ones([5, 3], F64);
    for (bad_x, bad_y) in [
        (Tensor::ones([5, 3], F64), y.shallow_clone()),
        (x.shallow_clone(), Tensor::ones([5, 4], F64)),
        (x.shallow_clone(), Tensor::ones([6, 3], F64)),
        (Tensor::ones([4], F64), Tensor::ones([1, 3], F64)),
    ] {
        assert!(matches!(m.update(&bad_x, &bad_y), Err(CeraError::Shape(_))));
    }
    let nan = Tensor::ones([5, 3], F64) / 0.0;
    assert!(matches!(m.update(&x, &nan), Err(CeraError::NonFinite(_))));
    let complex = Tensor::ones([5, 4], (Kind::ComplexFloat, Device::Cpu));
    assert!(matches!(m.update(&complex, &y), Err(CeraError::DType(_))));
    assert_eq!(m.tokens(), 0);
    assert!(max_abs(&m.state().unwrap().xx) == 0.0);

    m.update(&rng.randn(&[20, 4], F64), &rng.randn(&[20, 3], F64))
        .unwrap();
    for ridge in [-1.0, f64::NAN, f64::INFINITY] {
        let how = Solve { ridge, bias: false };
        assert!(matches!(m.solve(how), Err(CeraError::Value(_))));
    }
    let fit = m.solve(NO_RIDGE).unwrap();
    assert!(matches!(fit.factors(0), Err(CeraError::Value(_))));
    assert!(matches!(fit.factors(4), Err(CeraError::Value(_))));
    assert!(Moments::new(0, 3, Device::Cpu).is_err());

    let mut state = m.state().unwrap();
    state.sum_y = Tensor::zeros([4], F64);
    assert!(matches!(
        Moments::from_state(&state),
        Err(CeraError::Shape(_))
    ));
    let mut state = m.state().unwrap();
    state.xx = Tensor::eye(4, F64) + Tensor::ones([4, 4], F64).triu(1);
    assert!(matches!(
        Moments::from_state(&state),
        Err(CeraError::Value(_))
    ));
}

#[test]
fn a_zero_delta_is_linear() {
    let mut rng = Rng::new(10);
    let mut m = Moments::new(3, 2, Device::Cpu).unwrap();
    m.update(&rng.randn(&[10, 3], F64), &Tensor::zeros([10, 2], F64))
        .unwrap();
    let fit = m.solve(NO_RIDGE).unwrap();
    assert_eq!(fit.linearity(), &[1.0, 1.0, 1.0]);
    assert_eq!(max_abs(fit.weight()), 0.0);
}

#[test]
fn held_out_linearity_equals_the_direct_error_of_every_rank() {
    let mut rng = Rng::new(9);
    let (x, y) = silu_data(&mut rng, 400, 14, 10);
    let (train_x, test_x) = (x.narrow(0, 0, 120), x.narrow(0, 120, 280));
    let (train_y, test_y) = (y.narrow(0, 0, 120), y.narrow(0, 120, 280));
    let held_out = fitted(&test_x, &test_y);
    for bias in [false, true] {
        let fit = fitted(&train_x, &train_y)
            .solve(Solve { ridge: 0.0, bias })
            .unwrap();
        let curve = fit.linearity_on(&held_out).unwrap();
        assert_eq!(curve.len(), fit.linearity().len());
        for (k, got) in curve.iter().enumerate().skip(1) {
            let (b, a, b_bias) = fit.factors(k).unwrap();
            let want = 1.0 - unexplained(&test_x, &test_y, &b.mm(&a), b_bias.as_ref());
            assert!(
                (got - want).abs() < 1e-9,
                "bias {bias}, k {k}: {got} vs {want}"
            );
        }
        // On its own tokens it is the calibration curve.
        let own = fit.linearity_on(&fitted(&train_x, &train_y)).unwrap();
        for (a, b) in own.iter().zip(fit.linearity()) {
            assert!((a - b).abs() < 1e-9);
        }
        // 120 tokens for 14 inputs: the held-out curve is below the calibration one.
        assert!(curve[10] < fit.linearity()[10]);
    }
}

#[test]
fn held_out_linearity_refuses_other_shapes_and_empty_moments() {
    let mut rng = Rng::new(11);
    let (x, y) = silu_data(&mut rng, 50, 8, 6);
    let fit = fitted(&x, &y).solve(NO_RIDGE).unwrap();
    let other = Moments::new(8, 7, Device::Cpu).unwrap();
    assert!(matches!(fit.linearity_on(&other), Err(CeraError::Shape(_))));
    let empty = Moments::new(8, 6, Device::Cpu).unwrap();
    assert!(matches!(fit.linearity_on(&empty), Err(CeraError::Value(_))));
    // All-zero held-out deltas: exact for the zero map (an untrained adapter's), and
    // no share to score any other map by.
    let zeros = fitted(&x, &Tensor::zeros([50, 6], F64));
    assert!(matches!(fit.linearity_on(&zeros), Err(CeraError::Value(_))));
    let untrained = zeros.solve(NO_RIDGE).unwrap();
    assert_eq!(untrained.linearity_on(&zeros).unwrap(), vec![1.0; 7]);
}
