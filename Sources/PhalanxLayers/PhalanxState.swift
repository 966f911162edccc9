import PhalanxRuntime
import SWR

/// The decode state of a Phalanx layer (SWR.md section 3): per sequence and head the running
/// local state `w` of the current block, the inclusive gate product `g` since the block start and
/// the previous block's carrier `v`, and per sequence its position. It lives where the layer's
/// weights live: a `JaggedState` in host memory, or three float32 tensors on the GPU. Its size
/// never depends on how many positions have been processed:
///
///     bytes = (2 * headDim + 1) * heads * 4 * sequences
///
/// A device state is a value holding references to its tensors: a copy shares them, and the
/// layer's `infer` updates them in place (decoding passes the state `inout`).
public struct PhalanxState: MixerState {
    /// Where the numbers are.
    public enum Storage {
        /// The CPU operator's state.
        case host(JaggedState)
        /// `local` `[sequences, heads, headDim]`, `gateProduct` `[sequences, heads]`, `carrier`
        /// `[sequences, heads, headDim]`, float32 on one GPU.
        case device(local: Tensor, gateProduct: Tensor, carrier: Tensor)
    }

    /// The recurrence state.
    public internal(set) var storage: Storage
    /// Positions processed so far by each sequence (the offset in its block is this modulo the
    /// block length).
    public internal(set) var positions: [Int]
    /// Heads per position, channels per head, positions per block.
    public let heads: Int, headDim: Int, blockLength: Int

    /// Sequences held.
    public var sequences: Int { positions.count }

    /// `(2 * headDim + 1) * heads` floats per sequence, on either side: the same at every context.
    public var byteCount: Int {
        switch storage {
        case .host(let state): return state.byteCount
        case .device(let local, let gateProduct, let carrier): return (local.count + gateProduct.count + carrier.count) * 4
        }
    }

    /// The host state, for the CPU operator (stops with a message for a device state).
    var host: JaggedState {
        guard case .host(let state) = storage else { fatalError("PhalanxState: the state lives on a GPU; decode with the layer on that GPU") }
        return state
    }

    /// The parts' sequences in order, on the parts' device, each with its own position.
    public static func stacking(_ parts: [PhalanxState]) -> PhalanxState {
        require(!parts.isEmpty, "PhalanxState.stacking: no states")
        let first = parts[0]
        require(parts.allSatisfy { ($0.heads, $0.headDim, $0.blockLength) == (first.heads, first.headDim, first.blockLength) },
                "PhalanxState.stacking: the states differ in heads, head width or block length")
        let positions = parts.flatMap(\.positions)
        switch first.storage {
        case .host:
            return PhalanxState(storage: .host(.stacking(parts.map(\.host))), positions: positions, heads: first.heads,
                                headDim: first.headDim, blockLength: first.blockLength)
        case .device:
            let tensors = parts.map { part -> (Tensor, Tensor, Tensor) in
                guard case .device(let local, let gateProduct, let carrier) = part.storage else {
                    fatalError("PhalanxState.stacking: states on the CPU and on a GPU")
                }
                return (local, gateProduct, carrier)
            }
            return PhalanxState(storage: .device(local: Tensor(concatenating: tensors.map(\.0)),
                                                 gateProduct: Tensor(concatenating: tensors.map(\.1)),
                                                 carrier: Tensor(concatenating: tensors.map(\.2))),
                                positions: positions, heads: first.heads, headDim: first.headDim, blockLength: first.blockLength)
        }
    }
}

extension Tensor {
    /// `parts` (of one device and format, equal in every dimension but the first) joined along
    /// the first dimension: a new tensor, filled by one copy per part.
    public convenience init(concatenating parts: [Tensor]) {
        require(!parts.isEmpty, "Tensor(concatenating:): no parts")
        let inner = Array(parts[0].shape.dropFirst())
        require(parts.allSatisfy { Array($0.shape.dropFirst()) == inner && $0.device.isSame(as: parts[0].device) && $0.format == parts[0].format },
                "Tensor(concatenating:): parts \(parts.map(\.shape)) differ beyond the first dimension, in device or in format")
        self.init(uninitialized: [parts.reduce(0) { $0 + ($1.shape.first ?? 1) }] + inner, like: parts[0])
        var offset = 0
        for part in parts {
            switch device {
            case .cpu: (pointer + offset).update(from: part.pointer, count: part.count)
            case .cuda(let gpu):
                gpu.perform {
                    try Tensor(viewing: self, offset: offset, shape: part.shape).deviceBuffer.copy(from: part.deviceBuffer)
                }
            }
            offset += part.count
        }
    }
}
