import PhalanxLayers
import PhalanxRuntime

/// `count` values uniform in `-scale...scale`, drawn from the library's own seeded generator.
public func randomInputs(_ count: Int, scale: Float = 1, _ rng: inout SeededGenerator) -> [Float] {
    (0..<count).map { _ in Float.random(in: -scale...scale, using: &rng) }
}

/// A tensor of `shape` with values uniform in `-scale...scale`.
public func randomTensor(_ shape: [Int], scale: Float = 1, _ rng: inout SeededGenerator) -> Tensor {
    Tensor(randomInputs(shape.reduce(1, *), scale: scale, &rng), shape: shape)
}

/// Rows `range` of every sequence of `[batch, length, width]` values: `[batch, range.count, width]`.
public func rows<T>(_ x: [T], batch: Int, length: Int, width: Int, _ range: Range<Int>) -> [T] {
    (0..<batch).flatMap { b in x[((b * length + range.lowerBound) * width)..<((b * length + range.upperBound) * width)] }
}

/// Writes `part` (`[batch, range.count, width]`) into rows `range` of `x` (`[batch, length, width]`).
public func setRows<T>(_ x: inout [T], _ part: [T], batch: Int, length: Int, width: Int, _ range: Range<Int>) {
    let n = range.count * width
    for b in 0..<batch {
        x.replaceSubrange(((b * length + range.lowerBound) * width)..<((b * length + range.upperBound) * width),
                          with: part[(b * n)..<((b + 1) * n)])
    }
}

/// Reference layout `[batch, heads, channels, length]` (and gates `[batch, heads, length]`) to
/// this project's `[batch, length, heads, channels]` (`[batch, length, heads]`).
public func fromReferenceLayout<T>(_ x: [T], batch: Int, heads: Int, channels: Int, length: Int) -> [T] {
    var out = x
    for b in 0..<batch {
        for h in 0..<heads {
            for c in 0..<channels {
                for i in 0..<length {
                    out[((b * length + i) * heads + h) * channels + c] = x[((b * heads + h) * channels + c) * length + i]
                }
            }
        }
    }
    return out
}
