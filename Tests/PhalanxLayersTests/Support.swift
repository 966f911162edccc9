import Foundation

/// The fixture folder of this test target (`Bundle.module` is per target, so this stays here).
func fixture(_ name: String) -> URL {
    Bundle.module.url(forResource: "Fixtures/\(name)", withExtension: nil)!
}
