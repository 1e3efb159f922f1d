//! A folder of labelled leaf photos: one subfolder per class (its name is the label), photos inside. This is how
//! PlantVillage is laid out and how `smartfarm train disease` and `smartfarm eval disease` read their data.

use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use smartfarm_core::{Error, Result};

/// File endings taken as photos; anything else in a class folder is ignored (and counted).
const PHOTO_ENDINGS: &[&str] = &["jpg", "jpeg", "png", "webp"];

/// One labelled photo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelledPhoto {
    /// Where it is.
    pub path: PathBuf,
    /// Index of its class in [`LabelledFolder::classes`].
    pub class: usize,
}

/// The photos of a class-per-subfolder folder.
#[derive(Clone, Debug)]
pub struct LabelledFolder {
    /// Class names (the subfolders' names), sorted.
    pub classes: Vec<String>,
    /// Every photo, by class then file name.
    pub photos: Vec<LabelledPhoto>,
    /// Files that were not photos, skipped.
    pub skipped: usize,
}

impl LabelledFolder {
    /// Reads the folder's layout (not the photos). Needs at least one class with at least one photo.
    pub fn scan(dir: &Path) -> Result<Self> {
        let entries = std::fs::read_dir(dir)
            .map_err(|error| Error::invalid("data", format!("cannot read {}: {error}", dir.display())))?;
        let mut class_dirs: Vec<(String, PathBuf)> = Vec::new();
        for entry in entries {
            let entry =
                entry.map_err(|error| Error::invalid("data", format!("cannot read {}: {error}", dir.display())))?;
            if entry.path().is_dir() {
                class_dirs.push((entry.file_name().to_string_lossy().into_owned(), entry.path()));
            }
        }
        class_dirs.sort();
        if class_dirs.is_empty() {
            return Err(Error::invalid(
                "data",
                format!("{} has no class subfolders (one folder per class, photos inside)", dir.display()),
            ));
        }
        let mut folder = LabelledFolder { classes: Vec::new(), photos: Vec::new(), skipped: 0 };
        for (class, (name, path)) in class_dirs.into_iter().enumerate() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(&path)
                .map_err(|error| Error::invalid("data", format!("cannot read {}: {error}", path.display())))?
                .filter_map(|entry| entry.ok().map(|entry| entry.path()))
                .filter(|path| path.is_file())
                .collect();
            files.sort();
            let before = folder.photos.len();
            for file in files {
                let ending = file.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
                if PHOTO_ENDINGS.contains(&ending.as_str()) {
                    folder.photos.push(LabelledPhoto { path: file, class });
                } else {
                    folder.skipped += 1;
                }
            }
            if folder.photos.len() == before {
                return Err(Error::invalid(
                    "data",
                    format!("class folder {} has no photos (.jpg, .jpeg, .png, .webp)", path.display()),
                ));
            }
            folder.classes.push(name);
        }
        Ok(folder)
    }

    /// Photos per class.
    pub fn counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes.len()];
        for photo in &self.photos {
            counts[photo.class] += 1;
        }
        counts
    }

    /// Splits off a validation set: `fraction` of each class (at least one photo where the class has two),
    /// chosen at random with `seed`, so every class is represented in both parts in proportion.
    pub fn split(&self, fraction: f64, seed: u64) -> (Vec<LabelledPhoto>, Vec<LabelledPhoto>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut train = Vec::new();
        let mut validation = Vec::new();
        for class in 0..self.classes.len() {
            let mut photos: Vec<LabelledPhoto> = self.photos.iter().filter(|p| p.class == class).cloned().collect();
            photos.shuffle(&mut rng);
            let mut held = (photos.len() as f64 * fraction).round() as usize;
            if held == 0 && photos.len() >= 2 && fraction > 0.0 {
                held = 1;
            }
            validation.extend(photos.drain(..held));
            train.extend(photos);
        }
        (train, validation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_are_subfolders_and_the_split_is_stratified() {
        let dir = tempfile::tempdir().unwrap();
        for (class, count) in [("b_late", 10), ("a_early", 4)] {
            std::fs::create_dir(dir.path().join(class)).unwrap();
            for i in 0..count {
                std::fs::write(dir.path().join(class).join(format!("{i}.jpg")), b"x").unwrap();
            }
        }
        std::fs::write(dir.path().join("a_early").join("notes.txt"), b"x").unwrap();
        let folder = LabelledFolder::scan(dir.path()).unwrap();
        assert_eq!(folder.classes, vec!["a_early", "b_late"]);
        assert_eq!(folder.counts(), vec![4, 10]);
        assert_eq!(folder.skipped, 1);
        let (train, validation) = folder.split(0.2, 7);
        assert_eq!(validation.iter().filter(|p| p.class == 0).count(), 1);
        assert_eq!(validation.iter().filter(|p| p.class == 1).count(), 2);
        assert_eq!(train.len() + validation.len(), 14);
        assert_eq!(folder.split(0.2, 7).1, validation, "the split depends on the seed only");
    }

    #[test]
    fn empty_folders_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let error = LabelledFolder::scan(dir.path()).unwrap_err().to_string();
        assert!(error.contains("no class subfolders"), "{error}");
        std::fs::create_dir(dir.path().join("healthy")).unwrap();
        let error = LabelledFolder::scan(dir.path()).unwrap_err().to_string();
        assert!(error.contains("has no photos"), "{error}");
    }
}
