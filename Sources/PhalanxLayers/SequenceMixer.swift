import PhalanxRuntime
import SWR

/// A token mixer: a layer `[batch, length, dim] -> [batch, length, dim]` in which positions
/// exchange information (Phalanx, attention). Models hold mixers of different kinds behind this
/// protocol; each names its own cache and decode-state types, so the compiler checks that a
/// cache or state only ever reaches the mixer that made it.
public protocol SequenceMixer: ParameterContainer {
    /// What `backward` needs from `forward`, for one call.
    associatedtype Cache
    /// What a mixer carries from one inference call to the next (a recurrence state, a key/value
    /// cache). One type per mixer; `makeState` gives the state of empty sequences.
    associatedtype State: MixerState
    /// `x` `[batch, length, dim]` to `y` `[batch, length, dim]`, every sequence from its start.
    func forward(_ x: Tensor) -> (Tensor, Cache)
    /// Adds the parameter gradients and returns the input gradient.
    func backward(_ dy: Tensor, cache: Cache) -> Tensor
    /// The state of `batch` empty sequences.
    func makeState(batch: Int) -> State
    /// Continues each sequence from `state` by the positions of `x` (a prefill chunk of any size,
    /// or one decode step), leaving the state after the last one. Equal to `forward` over the
    /// whole sequence.
    func infer(_ x: Tensor, state: inout State) -> Tensor
}

/// A mixer's decode state: anything that can say how much memory it holds, and that can join the
/// states of separately prefilled prompts into one batch decoded together.
public protocol MixerState {
    /// Bytes held for all sequences of the state.
    var byteCount: Int { get }
    /// The sequences of `parts`, in order, as one state; each sequence keeps its own position.
    static func stacking(_ parts: [Self]) -> Self
}

extension JaggedState: MixerState {
    /// `bytesPerSequence * sequences`: the same at every context length.
    public var byteCount: Int { bytesPerSequence * sequences }

    /// The parts' sequences in order (every array is sequence-major, so the parts concatenate).
    public static func stacking(_ parts: [JaggedState]) -> JaggedState {
        require(!parts.isEmpty, "JaggedState.stacking: no states")
        let first = parts[0]
        require(parts.allSatisfy { ($0.heads, $0.headDim, $0.blockLength) == (first.heads, first.headDim, first.blockLength) },
                "JaggedState.stacking: the states differ in heads, head width or block length")
        var stacked = JaggedState(sequences: parts.reduce(0) { $0 + $1.sequences }, heads: first.heads, headDim: first.headDim,
                                  blockLength: first.blockLength)
        stacked.local = parts.flatMap(\.local)
        stacked.gateProduct = parts.flatMap(\.gateProduct)
        stacked.carrier = parts.flatMap(\.carrier)
        stacked.offset = parts.flatMap(\.offset)
        return stacked
    }
}


extension PhalanxLayer: SequenceMixer {
    /// `forward(x, state:)` without the cache for backward, on the CPU; on a GPU the decode
    /// kernels (`infer(_:state:on:)`).
    public func infer(_ x: Tensor, state: inout PhalanxState) -> Tensor {
        require(x.shape.count == 3 && x.shape[0] == state.sequences,
                "PhalanxLayer.infer: input must be [\(state.sequences), length, \(configuration.dim)], got \(x.shape)")
        if case .cuda(let gpu) = x.device { return infer(x, state: &state, on: gpu) }
        var host = state.host
        let y = forward(x, state: &host).0
        state.storage = .host(host)
        state.positions = state.positions.map { $0 + x.shape[1] }
        return y
    }
}
