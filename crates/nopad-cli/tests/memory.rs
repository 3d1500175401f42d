//! The memory plan as a user meets it: `nopad train` prints it before step 1 and refuses, before
//! allocating, a run that does not fit `--gpu-memory`, naming the modes that would; `nopad
//! stats --model M --gpu-memory G` prints the plan of every mode.

mod common;
use common::{args, nopad, ok, stderr};
use nopad_backend::cpu::Cpu;
use nopad_model::Recompute;
use nopad_train::{plan, DeviceSizes, MasterPrecision, Modes, StatePrecision, Trained};

const TRAIN: &str = "train --model tiny --steps 2 --max-len 48 --batch-size 4 --synthetic-examples 64 --device cpu --no-progress";

/// The largest micro-batch the printed plan names.
fn planned_tokens(err: &str) -> usize {
    let at = err
        .find("largest micro-batch ")
        .expect("the plan is printed")
        + 20;
    err[at..].split(' ').next().unwrap().parse().unwrap()
}

#[test]
fn train_prints_the_plan_and_refuses_a_run_that_cannot_fit() {
    let o = nopad(&args(TRAIN, &["--gpu-memory", "1000"]));
    let err = stderr(&o);
    ok(o);
    for term in ["weights", "moments", "gradients", "activations", "peak"] {
        assert!(err.contains(term), "{term} missing from\n{err}");
    }
    // A budget between what full recomputation and none need: the run as asked does not fit,
    // and the refusal names --recompute full.
    let tokens = planned_tokens(&err);
    let cfg = nopad_model::Config::preset("tiny").unwrap();
    let dev = DeviceSizes::of(&Cpu::<f32>::new());
    let m = Modes {
        states: StatePrecision::F32,
        master: MasterPrecision::F32,
        recompute: Recompute::None,
        grad_aliasing: true,
        optim_in_backward: false,
        offload: false,
        offload_acts: 0,
        trained: Trained::Full,
        ranks: 1,
        shard: 0,
    };
    let none = plan(&cfg, tokens, m, &dev).needed();
    let full = plan(
        &cfg,
        tokens,
        Modes {
            recompute: Recompute::Full,
            ..m
        },
        &dev,
    )
    .needed();
    assert!(full < none, "full {full} none {none}");
    let budget = format!("{:.12}", (full + none) as f64 / 2.0 / (1u64 << 30) as f64);
    let o = nopad(&args(TRAIN, &["--gpu-memory", &budget]));
    assert!(!o.status.success());
    // Nothing ran: no summary.
    assert!(
        o.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let err = stderr(&o);
    assert!(err.contains("the run does not fit"), "{err}");
    assert!(err.contains("--recompute full"), "{err}");
    assert!(err.contains("micro-batches of up to"), "{err}");
}

#[test]
fn stats_prints_the_plan_of_every_mode_with_what_fits() {
    let line = "stats --data synthetic-flan --examples 64 --max-len 64 --batch-size 4 --vocab-size 128256 --model llama-3.2-1b";
    let out = ok(nopad(&args(line, &["--gpu-memory", "80"])));
    assert!(
        out.contains("memory plan on a 80.00 GiB CUDA device"),
        "{out}"
    );
    for mode in [
        "f32/f32/none alias",
        "8bit/none/full alias",
        "bf16/f32/full in-bwd",
    ] {
        let row = out
            .lines()
            .find(|l| l.starts_with(mode))
            .unwrap_or_else(|| panic!("{mode} missing from\n{out}"));
        assert!(row.ends_with(" tokens"), "{row}");
    }
    let o = nopad(&args(
        "stats --data synthetic-flan --examples 8 --max-len 64 --batch-size 4 --gpu-memory 80",
        &[],
    ));
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--gpu-memory needs --model"),
        "{}",
        stderr(&o)
    );
}
