import Testing

/// A relative tolerance, named for what it compares: every check says which one it uses and why,
/// and none is loosened to make a test pass.
///
/// Relative to the reference's scale: `|actual - expected| <= relative * (|expected| + max|expected|)`.
public struct Tolerance: Sendable, Hashable, ExpressibleByFloatLiteral, CustomStringConvertible {
    public let relative: Double

    public init(_ relative: Double) { self.relative = relative }
    public init(floatLiteral value: Double) { relative = value }

    /// A float32 SWR kernel against its double reference: a window of 32 float32 multiply-adds
    /// keeps its rounding well below 1e-5 of the output's scale.
    public static let float32Kernel: Tolerance = 1e-5
    /// A float32 layer against its double reference: matrix products over a few hundred terms and
    /// float32 `exp`, a few hundred roundings of 6e-8 each.
    public static let float32Layer: Tolerance = 1e-4
    /// A double-precision analytic gradient against central differences of step 1e-6: truncation
    /// error about step^2 = 1e-12 times the third derivative, rounding about 1e-16 / 1e-6 = 1e-10
    /// of the loss's scale; 1e-7 leaves room for both and still catches any wrong term.
    public static let finiteDifference64: Tolerance = 1e-7

    public var description: String { "\(relative)" }
}

/// The largest error of `actual` against `expected`, relative to `|expected| + max|expected|`.
public func maxRelativeError(_ actual: [Float], _ expected: [Double]) -> Double {
    maxRelativeError(actual.map(Double.init), expected)
}

/// The largest error of `actual` against `expected`, relative to `|expected| + max|expected|`.
public func maxRelativeError(_ actual: [Double], _ expected: [Double]) -> Double {
    precondition(actual.count == expected.count, "compared \(actual.count) with \(expected.count) values")
    let scale = max(expected.map(abs).max() ?? 0, 1e-30)
    return zip(actual, expected).map { abs($0 - $1) / (abs($1) + scale) }.max() ?? 0
}

/// Expects `actual` (float32) to equal `expected` (a double reference) within `tolerance`,
/// with no non-finite value.
public func expectClose(_ actual: [Float], _ expected: [Double], tolerance: Tolerance,
                        _ comment: @autoclosure () -> String = "", sourceLocation: SourceLocation = #_sourceLocation) {
    #expect(!actual.contains { !$0.isFinite }, "non-finite value \(comment())", sourceLocation: sourceLocation)
    expectClose(actual.map(Double.init), expected, tolerance: tolerance, comment(), sourceLocation: sourceLocation)
}

/// Expects `actual` to equal `expected` within `tolerance` (both double: a reference's analytic
/// gradient against finite differences).
public func expectClose(_ actual: [Double], _ expected: [Double], tolerance: Tolerance,
                        _ comment: @autoclosure () -> String = "", sourceLocation: SourceLocation = #_sourceLocation) {
    #expect(actual.count == expected.count, "\(actual.count) values for \(expected.count) \(comment())",
            sourceLocation: sourceLocation)
    guard actual.count == expected.count else { return }
    #expect(!actual.contains { !$0.isFinite }, "non-finite value \(comment())", sourceLocation: sourceLocation)
    let error = maxRelativeError(actual, expected)
    #expect(error <= tolerance.relative, "relative error \(error) > \(tolerance) \(comment())", sourceLocation: sourceLocation)
}
