import SWR

/// A token mixer: a layer `[batch, length, dim] -> [batch, length, dim]` in which positions
/// exchange information (Phalanx, attention). Models hold mixers of different kinds behind this
/// protocol.
public protocol SequenceMixer: ParameterContainer {
    associatedtype Cache
    /// What a mixer carries from one inference call to the next (a recurrence state, a key/value
    /// cache). One type per mixer; `makeState` gives the state of empty sequences.
    associatedtype State
    func forward(_ x: Tensor) -> (Tensor, Cache)
    /// Adds the parameter gradients and returns the input gradient.
    func backward(_ dy: Tensor, cache: Cache) -> Tensor
    func makeState(batch: Int) -> State
    /// Continues each sequence from `state` by the positions of `x` (a prefill chunk of any size,
    /// or one decode step), leaving the state after the last one. Equal to `forward` over the
    /// whole sequence.
    func infer(_ x: Tensor, state: inout State) -> Tensor
}

extension PhalanxLayer: SequenceMixer {
    public func infer(_ x: Tensor, state: inout JaggedState) -> Tensor { forward(x, state: &state).0 }
}
