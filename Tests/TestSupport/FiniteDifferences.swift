/// Central finite differences of a double-precision scalar function at `probes` indices of `x`:
///
///     df/dx_i ≈ (f(x + h e_i) - f(x - h e_i)) / 2h        error O(h^2) + O(eps / h)
public func finiteDifferences(_ x: [Double], probes: [Int], step: Double = 1e-6, _ f: ([Double]) -> Double) -> [Double] {
    probes.map { i in
        var plus = x, minus = x
        plus[i] += step
        minus[i] -= step
        return (f(plus) - f(minus)) / (2 * step)
    }
}

/// All indices of a small array, an even spread of `limit` over a large one.
public func probes(_ count: Int, limit: Int = 200) -> [Int] {
    count <= limit ? Array(0..<count) : (0..<limit).map { $0 * count / limit }
}

public func dot(_ a: [Double], _ b: [Double]) -> Double {
    precondition(a.count == b.count, "dot of \(a.count) and \(b.count) values")
    return zip(a, b).reduce(0) { $0 + $1.0 * $1.1 }
}
