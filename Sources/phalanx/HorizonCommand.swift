import ArgumentParser
import Foundation
import SWR

struct HorizonCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "horizon",
        abstract: "How far back a decaying recurrence can see, and what a jagged window drops.")

    @Option(help: "Upper bound on the gates, in [0, 1) (the paper's models bound them near 0.8).")
    var rho: Double = 0.8

    @Option(help: "Tolerance relative to the input scale, in (0, 1).")
    var eps: Double = 1e-3

    @Option(help: "Block length of the jagged window to assess.")
    var blockLength: Int = 16

    func validate() throws {
        guard rho >= 0 && rho < 1 else {
            throw ValidationError("--rho must be in [0, 1); got \(rho). Gates of 1 never decay, so there is no finite horizon.")
        }
        guard eps > 0 && eps < 1 else { throw ValidationError("--eps must be in (0, 1); got \(eps).") }
        guard blockLength >= 1 else { throw ValidationError("--block-length must be at least 1; got \(blockLength).") }
    }

    func run() {
        let h = Horizon(rho: rho, eps: eps)
        let error = h.jaggedError(blockLength: blockLength)
        print("""
        Gates bounded by rho = \(rho); tolerance eps = \(eps).

        Horizon: \(h.distance) positions.
          An input's weight in an output d positions later is at most rho^d; everything beyond
          distance k weighs at most rho^(k+1) / (1 - rho). That tail falls below eps at k = \(h.distance)
          (tail there: \(String(format: "%.3g", h.tail(beyond: h.distance)))).

        Jagged window with block length \(blockLength) (k = 2, as in Phalanx):
          each position sees its own block and the whole previous one, at least \(UInt(blockLength) + 1) positions.
          Worst-case truncation error (at a block's first position): rho^(l+1) / (1 - rho) = \(String(format: "%.3g", error)).
          \(error < eps
            ? "That is below eps: for such gates the jagged window loses nothing that matters."
            : "That exceeds eps: a block length of at least \(h.minimumBlockLength) keeps the error below eps.")
        """)
    }
}
