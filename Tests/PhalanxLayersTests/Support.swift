import Foundation
import PhalanxLayers
import PhalanxRuntime
import Testing

/// Tolerance of a float32 layer against its double-precision reference, relative to scale:
/// `|actual - expected| <= tol * (|expected| + max|expected|)`.
let float32Tolerance = 1e-4

func maxRelativeError(_ actual: [Float], _ expected: [Double]) -> Double {
    precondition(actual.count == expected.count, "compared \(actual.count) with \(expected.count) values")
    let scale = max(expected.map(abs).max() ?? 0, 1e-30)
    return zip(actual, expected).map { abs(Double($0) - $1) / (abs($1) + scale) }.max() ?? 0
}

func expectClose(_ actual: [Float], _ expected: [Double], tolerance: Double = float32Tolerance,
                 _ comment: @autoclosure () -> String = "", sourceLocation: SourceLocation = #_sourceLocation) {
    #expect(actual.count == expected.count, sourceLocation: sourceLocation)
    #expect(!actual.contains { !$0.isFinite }, "non-finite value \(comment())", sourceLocation: sourceLocation)
    let error = maxRelativeError(actual, expected)
    #expect(error <= tolerance, "relative error \(error) > \(tolerance) \(comment())", sourceLocation: sourceLocation)
}

func randomTensor(_ shape: [Int], scale: Float = 1, _ rng: inout SeededGenerator) -> Tensor {
    Tensor((0..<shape.reduce(1, *)).map { _ in Float.random(in: -scale...scale, using: &rng) }, shape: shape)
}

/// Central finite differences of a double-precision scalar function, at `probes` indices of `x`.
func finiteDifferences(_ x: [Double], probes: [Int], step: Double = 1e-6, _ f: ([Double]) -> Double) -> [Double] {
    probes.map { i in
        var plus = x, minus = x
        plus[i] += step
        minus[i] -= step
        return (f(plus) - f(minus)) / (2 * step)
    }
}

/// All indices of a small array, an even spread of `limit` over a large one.
func probes(_ count: Int, limit: Int = 200) -> [Int] {
    count <= limit ? Array(0..<count) : (0..<limit).map { $0 * count / limit }
}

func dot(_ a: [Double], _ b: [Double]) -> Double { zip(a, b).reduce(0) { $0 + $1.0 * $1.1 } }

/// The fixture folder of this test target.
func fixture(_ name: String) -> URL {
    Bundle.module.url(forResource: "Fixtures/\(name)", withExtension: nil)!
}
