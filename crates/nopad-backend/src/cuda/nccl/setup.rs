//! What joining a communicator needs: the id rank 0 makes and hands out as bytes, and the
//! non-blocking configuration.

use cudarc::nccl::sys::{ncclConfig_t, ncclUniqueId};

use super::library::{library, SUCCESS};
use crate::{BackendError, Result};

/// The bytes of an [`NcclId`].
pub const NCCL_ID_BYTES: usize = 128;

/// NCCL's unique id of one communicator: made by rank 0, handed to every other rank as bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NcclId([u8; NCCL_ID_BYTES]);

impl NcclId {
    /// A fresh id (`ncclGetUniqueId`; rank 0 only). Fails with [`BackendError::Unavailable`]
    /// when libnccl cannot be loaded.
    pub fn new() -> Result<NcclId> {
        let lib = library()?;
        let mut raw = ncclUniqueId {
            internal: [0; NCCL_ID_BYTES],
        };
        // SAFETY: writes one ncclUniqueId.
        let code = unsafe { (lib.get_unique_id)(&mut raw) };
        if code != SUCCESS {
            return Err(BackendError::Device {
                op: "ncclGetUniqueId".into(),
                msg: lib.describe(code, std::ptr::null_mut()),
            });
        }
        Ok(NcclId(raw.internal.map(|c| c as u8)))
    }

    /// The id rank 0 sent, from its bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<NcclId> {
        let raw: [u8; NCCL_ID_BYTES] = bytes.try_into().map_err(|_| BackendError::Shape {
            op: "NcclId::from_bytes",
            what: format!("{} bytes, an NCCL id has {NCCL_ID_BYTES}", bytes.len()),
        })?;
        Ok(NcclId(raw))
    }

    /// The bytes to send to the other ranks.
    pub fn as_bytes(&self) -> &[u8; NCCL_ID_BYTES] {
        &self.0
    }

    pub(super) fn raw(&self) -> ncclUniqueId {
        ncclUniqueId {
            internal: self.0.map(|b| b as std::ffi::c_char),
        }
    }
}

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The id holds rank 0's address; a digest is enough to compare two in a log.
        let digest = self.0.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        write!(f, "NcclId({digest:016x})")
    }
}

/// The non-blocking configuration: every field NCCL's `NCCL_CONFIG_INITIALIZER` leaves undefined
/// stays so (NCCL chooses), `blocking = 0`. NCCL reads `size` bytes of it (up to its own struct),
/// so an older library reads the fields it knows and a newer one defaults the rest.
pub(super) fn config() -> ncclConfig_t {
    const UNDEF: i32 = i32::MIN;
    let null = std::ptr::null();
    ncclConfig_t {
        size: std::mem::size_of::<ncclConfig_t>(),
        magic: 0xcafe_beef,
        // The layout cudarc's struct follows: NCCL 2.30.
        version: 23000,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: null,
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: null,
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
        maxP2pPeers: UNDEF,
    }
}
