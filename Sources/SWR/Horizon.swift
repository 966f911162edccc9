import PhalanxRuntime
import Foundation

/// The computational horizon of a decaying linear recurrence (SWR.md section 3).
///
/// With every gate at most `rho < 1`, the weight of input `u_j` in output `x_i` is at most
/// `rho^(i-j)`, and all inputs beyond distance `k` together weigh at most
///
///     sum_{d > k} rho^d = rho^(k+1) / (1 - rho)      (per unit of input scale)
///
/// so the operator is below `eps` beyond
///
///     k = ceil( log(eps * (1 - rho)) / log(rho) ) - 1.
///
/// A jagged window of block length `l` keeps at least the last `l` positions before a block's
/// first position and drops everything older: its truncation error at offset `o` inside a block is
/// at most `rho^(l+1+o) / (1 - rho)`, worst at `o = 0`.
public struct Horizon: Sendable, Equatable {
    /// Upper bound on the gates, in `[0, 1)`.
    public let rho: Double
    /// Tolerance, relative to the input scale, in `(0, 1)`.
    public let eps: Double

    /// The horizon for gates at most `rho` (in `[0, 1)`) and tolerance `eps` (in `(0, 1)`).
    public init(rho: Double, eps: Double) {
        require(rho >= 0 && rho < 1, "Horizon: rho must be in [0, 1), got \(rho) (gates of 1 never decay: no finite horizon)")
        require(eps > 0 && eps < 1, "Horizon: eps must be in (0, 1), got \(eps)")
        self.rho = rho
        self.eps = eps
    }

    /// Tail weight beyond distance `k`: `rho^(k+1) / (1 - rho)` (any `k >= 0`, `Int.max` included).
    public func tail(beyond k: Int) -> Double { pow(rho, Double(k) + 1) / (1 - rho) }

    /// The smallest distance `k >= 0` whose tail is below `eps`.
    ///
    /// The closed form is evaluated in logarithms (`log eps + log1p(-rho)`), which stay finite for
    /// every valid `eps`, even a subnormal one, and give at most about `7e18` (for the largest
    /// `rho` below 1), so the estimate always fits `Int`. Rounding can put it a few positions
    /// off; the exact answer is then found by a galloping search and bisection on the
    /// (monotone) tail, in `O(log)` evaluations rather than a walk.
    public var distance: Int {
        if rho == 0 { return 0 }
        let estimate = ((log(eps) + log1p(-rho)) / log(rho)).rounded(.up) - 1
        let guess = Int(Swift.min(Swift.max(estimate, 0), Double(Int.max / 2)))
        // Invariant: tail(beyond: high) < eps, and low == -1 or tail(beyond: low) >= eps.
        var low = -1, high = guess, step = 1
        while tail(beyond: high) >= eps {
            low = high
            high = high > Int.max - step ? Int.max : high + step
            step = step > Int.max / 2 ? step : step * 2
        }
        step = 1
        while low == -1 && high > 0 {
            let probe = Swift.max(high - step, 0)
            if tail(beyond: probe) < eps { high = probe } else { low = probe }
            if probe == 0 { break }
            step = step > Int.max / 2 ? step : step * 2
        }
        if low == -1 { return high }
        while high - low > 1 {
            let middle = low + (high - low) / 2
            if tail(beyond: middle) < eps { high = middle } else { low = middle }
        }
        return high
    }

    /// Worst-case truncation error of a jagged window (k = 2) with block length `l`, at a block's
    /// first position: `rho^(l+1) / (1 - rho)`.
    public func jaggedError(blockLength l: Int) -> Double { tail(beyond: l) }

    /// Truncation error bound at offset `o` inside a block: `rho^(l+1+o) / (1 - rho)`.
    public func jaggedError(blockLength l: Int, offset o: Int) -> Double { pow(rho, Double(l) + Double(o) + 1) / (1 - rho) }

    /// The shortest block length whose jagged window stays below `eps` everywhere (= `distance`).
    public var minimumBlockLength: Int { max(distance, 1) }
}
