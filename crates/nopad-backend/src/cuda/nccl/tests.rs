//! CPU checks of the NCCL module: element types, sizes, shards, ids and the configuration.

use super::setup::config;
use super::*;
use cudarc::nccl::sys::ncclConfig_t;

#[test]
fn sums_keep_the_buffer_type_and_copies_move_bytes() {
    use ncclDataType_t as T;
    assert_eq!(
        nccl_type("t", Dtype::F32, Op::Sum).unwrap(),
        (T::ncclFloat32, 1)
    );
    assert_eq!(
        nccl_type("t", Dtype::Bf16, Op::Sum).unwrap(),
        (T::ncclBfloat16, 1)
    );
    assert_eq!(
        nccl_type("t", Dtype::I32, Op::Sum).unwrap(),
        (T::ncclInt32, 1)
    );
    for d in [Dtype::F32, Dtype::Bf16, Dtype::I32, Dtype::U16, Dtype::U8] {
        assert_eq!(
            nccl_type("t", d, Op::Copy).unwrap(),
            (T::ncclUint8, d.size()),
            "{d:?}"
        );
    }
    for d in [Dtype::U16, Dtype::U8] {
        let e = nccl_type("reduce_scatter", d, Op::Sum)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("reduce_scatter") && e.contains(&format!("{d:?}")),
            "{e}"
        );
    }
    // The numbers NCCL's header gives them.
    assert_eq!(T::ncclBfloat16 as u32, 9);
    assert_eq!(T::ncclFloat64 as u32, 8);
    assert_eq!(SUM, 0);
}

#[test]
fn a_view_shorter_than_the_collective_is_refused() {
    let v = CudaMut::raw(0x1000, 10, Dtype::Bf16);
    assert!(check_len("all_reduce", &v, 10).is_ok());
    let e = check_len("all_reduce", &v, 11).unwrap_err().to_string();
    assert!(
        e.contains("all_reduce") && e.contains("10 elements") && e.contains("11"),
        "{e}"
    );
    assert_eq!(
        size_words(1000, Dtype::Bf16),
        "1000 Bf16 elements (2000 bytes)"
    );
}

#[test]
fn shards_tile_the_range_and_fit_the_padded_slots() {
    for (n, w) in [
        (10, 3),
        (9, 3),
        (2, 4),
        (1, 8),
        (7, 1),
        (1000, 8),
        (1001, 8),
    ] {
        let per = usize::div_ceil(n, w);
        let mut next = 0;
        for r in 0..w {
            let s = shard(n, r, w);
            assert_eq!(s.start, next, "n={n} w={w} r={r}");
            // Each shard lies in its rank's slot of the padded buffer NCCL works on.
            assert!(s.is_empty() || (s.start == r * per && s.end <= (r + 1) * per));
            next = s.end;
        }
        assert_eq!(next, n, "n={n} w={w}");
    }
}

#[test]
fn ids_round_trip_through_bytes_and_refuse_other_lengths() {
    let mut bytes = [0u8; NCCL_ID_BYTES];
    bytes
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i * 7) as u8);
    let id = NcclId::from_bytes(&bytes).unwrap();
    assert_eq!(id.as_bytes(), &bytes);
    assert_eq!(id.raw().internal[5], 35);
    assert!(format!("{id:?}").starts_with("NcclId("));
    let e = NcclId::from_bytes(&bytes[..100]).unwrap_err().to_string();
    assert!(e.contains("100 bytes") && e.contains("128"), "{e}");
}

#[test]
fn the_configuration_is_non_blocking_and_leaves_the_rest_to_nccl() {
    let c = config();
    assert_eq!(c.blocking, 0);
    assert_eq!(c.magic, 0xcafe_beef);
    assert_eq!(c.size, std::mem::size_of::<ncclConfig_t>());
    assert_eq!((c.minCTAs, c.splitShare), (i32::MIN, i32::MIN));
    assert!(c.netName.is_null() && c.commName.is_null());
}
