import Foundation

/// A small, fast, seeded random number generator (SplitMix64): the same stream on every machine,
/// so initialisation, data order and tests are reproducible from one seed.
public struct SeededGenerator: RandomNumberGenerator, Hashable, Sendable, Codable {
    /// The whole state: saving it and restoring it resumes the exact stream.
    public var state: UInt64

    /// The generator whose stream starts from `seed`; equal seeds give equal streams.
    public init(seed: UInt64) { state = seed }

    /// The next 64 random bits: advances the state by the golden-ratio increment and mixes it.
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// A standard normal draw (Box-Muller).
    public mutating func normal() -> Float {
        let u1 = Double.random(in: Double.ulpOfOne..<1, using: &self)
        let u2 = Double.random(in: 0..<1, using: &self)
        return Float((-2 * log(u1)).squareRoot() * cos(2 * Double.pi * u2))
    }
}
