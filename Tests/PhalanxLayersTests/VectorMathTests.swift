import Foundation
import PhalanxRuntime
import Testing

/// The 16-lane `exp`, `exp2` and `sigmoid` that the element-wise passes use, against the C
/// library in double precision.
@Suite("Vector math")
struct VectorMathTests {
    /// Relative error of each lane of `f` against `reference`, over `points` spread on `range`.
    func worstRelativeError(_ range: ClosedRange<Float>, points: Int = 200_000,
                            _ f: (SIMD16<Float>) -> SIMD16<Float>, _ reference: (Double) -> Double) -> Double {
        var worst = 0.0
        for start in stride(from: 0, to: points, by: 16) {
            var x = SIMD16<Float>()
            for lane in 0..<16 {
                x[lane] = range.lowerBound + (range.upperBound - range.lowerBound) * Float(start + lane) / Float(points - 1)
            }
            let y = f(x)
            for lane in 0..<16 {
                let exact = reference(Double(x[lane]))
                worst = max(worst, abs(Double(y[lane]) - exact) / exact)
            }
        }
        return worst
    }

    @Test("exp is within a few float ulps over the whole normal range")
    func expAccuracy() {
        #expect(worstRelativeError(-87.3...88, { exp($0) }, Foundation.exp) < 4e-7)
    }

    @Test("exp2 is within a few float ulps from -126 to 127")
    func exp2Accuracy() {
        #expect(worstRelativeError(-126...127, { exp2($0) }, Foundation.exp2) < 4e-7)
    }

    @Test("sigmoid is within a few float ulps, including deep in both tails")
    func sigmoidAccuracy() {
        #expect(worstRelativeError(-80...80, { sigmoid($0) }, { 1 / (1 + Foundation.exp(-$0)) }) < 5e-7)
        #expect(sigmoid(Float(3)) == sigmoid(SIMD16<Float>(repeating: 3))[0])
    }

    @Test("extremes: underflow gives 0, overflow gives infinity, NaN stays NaN, sigmoid saturates")
    func extremes() {
        var x = SIMD16<Float>(repeating: 0)
        x[0] = -.infinity; x[1] = -1000; x[2] = -88; x[3] = .infinity; x[4] = 1000; x[5] = 89; x[6] = .nan
        let e = exp(x)
        #expect(e[0] == 0 && e[1] == 0 && e[2] == 0)
        #expect(e[3] == .infinity && e[4] == .infinity && e[5] == .infinity)
        #expect(e[6].isNaN)
        #expect(e[7] == 1)
        let s = sigmoid(x)
        #expect(s[0] == 0 && s[1] == 0 && s[3] == 1 && s[4] == 1 && s[6].isNaN && s[7] == 0.5)
        let p = exp2(x)
        #expect(p[0] == 0 && p[1] == 0 && p[7] == 1)
    }

    @Test("applySigmoid scales, and covers counts that are not multiples of 16")
    func applySigmoidTail() {
        for count in [0, 1, 15, 16, 17, 40] {
            var values = (0..<count).map { Float($0) / 4 - 3 }
            let expected = values.map { 0.8 * 1 / (1 + Foundation.exp(-Double($0))) }
            values.withUnsafeMutableBufferPointer { applySigmoid($0.baseAddress!, count: count, scale: 0.8) }
            for i in 0..<count { #expect(abs(Double(values[i]) - expected[i]) < 1e-6) }
        }
    }

    @Test("sumLanes gives each head its own 16-lane sum, for counts that fill trees and leave rests")
    func laneSumsOfHeads() {
        // Integer values: every order of addition gives the exact sum, so a lane or head taken from
        // the wrong place (not rounding) is what a mismatch means.
        for count in [1, 7, 8, 9, 15, 16, 17, 24, 37] {
            let terms = (0..<(count * 16)).map { Float(($0 * 7919) % 1013) - 500 }
            var sums = [Float](repeating: .nan, count: count)
            terms.withUnsafeBufferPointer { t in
                sums.withUnsafeMutableBufferPointer { sumLanes(of: t.baseAddress!, count: count, into: $0.baseAddress!) }
            }
            let expected = (0..<count).map { h in terms[(16 * h)..<(16 * h + 16)].reduce(0, +) }
            #expect(sums == expected, "count \(count)")
        }
    }
}
