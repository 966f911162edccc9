/// A token mixer: a layer `[batch, length, dim] -> [batch, length, dim]` in which positions
/// exchange information (Phalanx, attention). Models hold mixers of different kinds behind this
/// protocol.
public protocol SequenceMixer: ParameterContainer {
    associatedtype Cache
    func forward(_ x: Tensor) -> (Tensor, Cache)
    /// Adds the parameter gradients and returns the input gradient.
    func backward(_ dy: Tensor, cache: Cache) -> Tensor
}

extension PhalanxLayer: SequenceMixer {}
