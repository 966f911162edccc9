import PhalanxLayers
import PhalanxRuntime

/// The order and grouping in which gradients are all-reduced, identical on every rank (DDP's
/// bucketing; PyTorch `torch/csrc/distributed/c10d/reducer.cpp`).
///
/// Parameters are taken in reverse of their model order, the order in which backward finishes
/// them, so the first bucket is ready first and its reduction can overlap the rest of backward.
/// Consecutive parameters fill a bucket while its size stays within the cap: `firstCap` (1 MiB)
/// for the first bucket, so communication starts early, then `cap` (25 MiB). A parameter larger
/// than the cap gets a bucket of its own. Sizes are float32 gradients, 4 bytes per element.
///
/// The plan depends only on the parameter list (names and sizes), so every rank, building its
/// model from the same configuration, gets the same plan; `signature` lets them check.
public struct GradientBucketPlan: Equatable, Sendable {
    /// One all-reduce: parameters (indices into the model's parameter list, in reduction order)
    /// and their total gradient bytes.
    public struct Bucket: Equatable, Sendable {
        /// Indices into the parameter list, descending (reverse model order).
        public let parameters: [Int]
        /// The sum of their gradients' bytes.
        public let byteCount: Int
    }

    /// DDP's first-bucket cap: 1 MiB.
    public static let defaultFirstCap = 1 << 20
    /// DDP's bucket cap: 25 MiB.
    public static let defaultCap = 25 << 20

    /// The buckets, in the order they are reduced.
    public let buckets: [Bucket]
    /// `name:bytes` of every parameter in plan order, `|` between buckets: equal on every rank or the run must stop.
    public let signature: String

    /// The plan for gradients of `byteCounts[i]` bytes, named `names[i]` (for the signature).
    public init(names: [String], byteCounts: [Int], firstCap: Int = defaultFirstCap, cap: Int = defaultCap) {
        require(names.count == byteCounts.count, "GradientBucketPlan: \(names.count) names for \(byteCounts.count) sizes")
        require(firstCap > 0 && cap > 0, "GradientBucketPlan: caps must be positive, got \(firstCap) and \(cap)")
        require(byteCounts.allSatisfy { $0 >= 0 }, "GradientBucketPlan: a negative size")
        var buckets: [Bucket] = []
        var current: [Int] = []
        var bytes = 0
        for index in byteCounts.indices.reversed() {
            let limit = buckets.isEmpty ? firstCap : cap
            if !current.isEmpty && bytes + byteCounts[index] > limit {
                buckets.append(Bucket(parameters: current, byteCount: bytes))
                current = []
                bytes = 0
            }
            current.append(index)
            bytes += byteCounts[index]
        }
        if !current.isEmpty { buckets.append(Bucket(parameters: current, byteCount: bytes)) }
        self.buckets = buckets
        signature = buckets.map { $0.parameters.map { "\(names[$0]):\(byteCounts[$0])" }.joined(separator: ",") }.joined(separator: "|")
    }

    /// The plan for a model's parameters (float32 gradients).
    public init(_ parameters: [Parameter], firstCap: Int = defaultFirstCap, cap: Int = defaultCap) {
        self.init(names: parameters.map(\.name), byteCounts: parameters.map { $0.gradient.count * 4 }, firstCap: firstCap, cap: cap)
    }

    /// The gradients of `bucket`, in its order, from the parameter list the plan was made from.
    public func gradients(of bucket: Bucket, in parameters: [Parameter]) -> [Tensor] {
        bucket.parameters.map { parameters[$0].gradient }
    }
}
