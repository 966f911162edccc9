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

    /// Tail weight beyond distance `k`: `rho^(k+1) / (1 - rho)`.
    public func tail(beyond k: Int) -> Double { pow(rho, Double(k + 1)) / (1 - rho) }

    /// The smallest distance `k >= 0` whose tail is below `eps`.
    public var distance: Int {
        if rho == 0 { return 0 }
        var k = max(Int((log(eps * (1 - rho)) / log(rho)).rounded(.up)) - 1, 0)
        // Guard the closed form against rounding at exact powers.
        while k > 0 && tail(beyond: k - 1) < eps { k -= 1 }
        while tail(beyond: k) >= eps { k += 1 }
        return k
    }

    /// Worst-case truncation error of a jagged window (k = 2) with block length `l`, at a block's
    /// first position: `rho^(l+1) / (1 - rho)`.
    public func jaggedError(blockLength l: Int) -> Double { tail(beyond: l) }

    /// Truncation error bound at offset `o` inside a block: `rho^(l+1+o) / (1 - rho)`.
    public func jaggedError(blockLength l: Int, offset o: Int) -> Double { tail(beyond: l + o) }

    /// The shortest block length whose jagged window stays below `eps` everywhere (= `distance`).
    public var minimumBlockLength: Int { max(distance, 1) }
}
