import PhalanxRuntime
import Foundation
import SWR
import Testing


/// Gate regimes that stress different parts of the operators.
enum GateRegime: CaseIterable, CustomStringConvertible {
    case uniform, nearZero, nearOne, edges
    var description: String { "\(self)" }

    func draw(_ count: Int, _ rng: inout SeededGenerator) -> [Float] {
        (0..<count).map { _ in
            switch self {
            case .uniform: Float.random(in: 0...1, using: &rng)
            case .nearZero: Float(pow(10, Double.random(in: -9 ... -2, using: &rng)))
            case .nearOne: Float(1 - pow(10, Double.random(in: -7 ... -2, using: &rng)))
            case .edges: [0, 1, 1e-12, 1 - 1.0 / 1_048_576, 0.5][Int.random(in: 0..<5, using: &rng)]
            }
        }
    }
}

func randomInputs(_ count: Int, _ rng: inout SeededGenerator) -> [Float] {
    (0..<count).map { _ in Float.random(in: -1...1, using: &rng) }
}

/// Tolerance of a float32 kernel against a double reference, relative to the reference's scale:
/// `|actual - expected| <= tol * (|expected| + max|expected|)`. A window of 32 float32
/// multiply-adds keeps its rounding well below 1e-5 of that scale.
let float32Tolerance = 1e-5

func maxRelativeError(_ actual: [Float], _ expected: [Double]) -> Double {
    precondition(actual.count == expected.count)
    let scale = max(expected.map(abs).max() ?? 0, 1e-30)
    var worst = 0.0
    for (a, e) in zip(actual, expected) {
        worst = max(worst, abs(Double(a) - e) / (abs(e) + scale))
    }
    return worst
}

func expectClose(_ actual: [Float], _ expected: [Double], tolerance: Double = float32Tolerance,
                 _ comment: @autoclosure () -> String = "", sourceLocation: SourceLocation = #_sourceLocation) {
    #expect(actual.count == expected.count, sourceLocation: sourceLocation)
    #expect(!actual.contains { !$0.isFinite }, "non-finite output \(comment())", sourceLocation: sourceLocation)
    let error = maxRelativeError(actual, expected)
    #expect(error <= tolerance, "relative error \(error) > \(tolerance) \(comment())", sourceLocation: sourceLocation)
}

/// Runs the jagged window on arrays (a fresh state unless one is given).
func jagged(_ window: JaggedWindow, gates: [Float], inputs: [Float], layout: SequenceLayout,
            state: inout JaggedState, pool: WorkerPool = .shared) -> [Float] {
    var out = [Float](repeating: .nan, count: inputs.count)
    gates.withUnsafeBufferPointer { a in
        inputs.withUnsafeBufferPointer { u in
            out.withUnsafeMutableBufferPointer { y in
                window.forward(gates: a, inputs: u, output: y, layout: layout, state: &state, pool: pool)
            }
        }
    }
    return out
}

func jagged(_ window: JaggedWindow, gates: [Float], inputs: [Float], layout: SequenceLayout) -> [Float] {
    var state = JaggedState(for: layout, blockLength: window.blockLength)
    return jagged(window, gates: gates, inputs: inputs, layout: layout, state: &state)
}

func exact(gates: [Float], inputs: [Float], layout: SequenceLayout, state: inout ExactState,
           pool: WorkerPool = .shared) -> [Float] {
    var out = [Float](repeating: .nan, count: inputs.count)
    gates.withUnsafeBufferPointer { a in
        inputs.withUnsafeBufferPointer { u in
            out.withUnsafeMutableBufferPointer { y in
                ExactRecurrence().forward(gates: a, inputs: u, output: y, layout: layout, state: &state, pool: pool)
            }
        }
    }
    return out
}

/// Reference layout `[batch, heads, channels, length]` (and gates `[batch, heads, length]`) to
/// this project's `[batch, length, heads, channels]` (`[batch, length, heads]`).
func fromReferenceLayout<T>(_ x: [T], batch: Int, heads: Int, channels: Int, length: Int) -> [T] {
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

/// The fixture folder of this test target.
func fixture(_ name: String) -> URL {
    Bundle.module.url(forResource: "Fixtures/\(name)", withExtension: nil)!
}

/// Rows `range` of every sequence of a uniform batch: `x` is `[batch, length, width]`, the result
/// `[batch, range.count, width]`.
func rows(_ x: [Float], batch: Int, length: Int, width: Int, _ range: Range<Int>) -> [Float] {
    var out: [Float] = []
    out.reserveCapacity(batch * range.count * width)
    for b in 0..<batch {
        out += x[((b * length + range.lowerBound) * width)..<((b * length + range.upperBound) * width)]
    }
    return out
}

/// Writes `part` (`[batch, range.count, width]`) into rows `range` of `x` (`[batch, length, width]`).
func setRows(_ x: inout [Float], _ part: [Float], batch: Int, length: Int, width: Int, _ range: Range<Int>) {
    let n = range.count * width
    for b in 0..<batch {
        x.replaceSubrange(((b * length + range.lowerBound) * width)..<((b * length + range.upperBound) * width),
                          with: part[(b * n)..<((b + 1) * n)])
    }
}
